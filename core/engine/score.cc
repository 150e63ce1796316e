#include "core/engine/score.h"

#include <cstring>

#include "core/base/status_macros.h"
#include "core/model/safetensors.h"

namespace expertmesh::engine {

absl::StatusOr<ScoreResult> Score(model::Model& model, const std::vector<int32_t>& ids,
                                  int64_t batch, int64_t tokens, const ScoreOptions& o) {
  if (batch <= 0 || tokens <= 0 || static_cast<int64_t>(ids.size()) != batch * tokens) {
    return absl::InvalidArgumentError("score: input_ids must be [batch, tokens] with both > 0");
  }
  if (o.prefill <= 0 || o.prefill > tokens) {
    return absl::InvalidArgumentError("score: --prefill must be in [1, " + std::to_string(tokens) +
                                      "]");
  }
  if (o.mtp && (model.weights().mtp.empty() || o.prefill < 2)) {
    return absl::FailedPreconditionError(
        "score: --mtp needs a model with MTP layers and a prefill of at least 2 tokens");
  }
  const int64_t V = model.config().vocab_size;
  ScoreResult r{batch, tokens, V, {}, {}};
  r.logits.reserve(batch * tokens * V);
  const int64_t chunk = o.chunk > 0 ? o.chunk : o.prefill;
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* t = ids.data() + b * tokens;
    model::SequenceState st = model.NewState();
    model::ForwardOptions all;
    all.all_logits = true;
    for (int64_t p = 0; p < o.prefill; p += chunk) {
      model::Segment s{&st, absl::MakeConstSpan(t + p, std::min(chunk, o.prefill - p))};
      EM_ASSIGN_OR_RETURN(std::vector<float> l, model.Forward({&s, 1}, all));
      r.logits.insert(r.logits.end(), l.begin(), l.end());
      if (o.progress && chunk < o.prefill) {
        o.progress("sequence " + std::to_string(b) + ": prefill " +
                   std::to_string(std::min(p + chunk, o.prefill)) + "/" +
                   std::to_string(o.prefill) + " tokens");
      }
    }
    for (int64_t p = o.prefill; p < tokens; ++p) {
      model::Segment s{&st, absl::MakeConstSpan(t + p, 1)};
      EM_ASSIGN_OR_RETURN(std::vector<float> l, model.Forward({&s, 1}, {}));
      r.logits.insert(r.logits.end(), l.begin(), l.end());
      if (o.progress && (p - o.prefill + 1) % 100 == 0) {
        o.progress("sequence " + std::to_string(b) + ": " + std::to_string(p + 1) + "/" +
                   std::to_string(tokens) + " tokens");
      }
    }
    if (o.mtp) {
      // A fresh trunk over the first N-1 tokens; MTP block 0 reads its final streams and the
      // next tokens (golden.json, mtp_logits).
      const int64_t n = o.prefill - 1;
      model::SequenceState ms = model.NewState();
      std::vector<float> streams;
      model::ForwardOptions fo;
      fo.final_streams = &streams;
      model::Segment s{&ms, absl::MakeConstSpan(t, n)};
      EM_RETURN_IF_ERROR(model.Forward({&s, 1}, fo).status());
      model::Segment m{&ms, absl::MakeConstSpan(t + 1, n)};
      EM_ASSIGN_OR_RETURN(std::vector<float> l, model.ForwardMtp(0, {&m, 1}, streams.data(), true));
      r.mtp_logits.insert(r.mtp_logits.end(), l.begin(), l.end());
    }
    if (o.progress) {
      o.progress("sequence " + std::to_string(b + 1) + "/" + std::to_string(batch) + " done");
    }
  }
  return r;
}

absl::Status ScoreFile(model::Model& model, const std::string& input, const std::string& out,
                       const ScoreOptions& options) {
  EM_ASSIGN_OR_RETURN(auto file, model::SafetensorsFile::Open(input));
  EM_ASSIGN_OR_RETURN(model::TensorView t, file->Get("input_ids"));
  if (t.dtype != model::DType::kI32 || t.shape.size() != 2) {
    return absl::InvalidArgumentError(input + ": input_ids must be I32 [batch, tokens], got " +
                                      std::string(model::DTypeName(t.dtype)) + " " +
                                      model::ShapeString(t.shape));
  }
  std::vector<int32_t> ids(t.nbytes / 4);
  std::memcpy(ids.data(), t.data, t.nbytes);
  EM_ASSIGN_OR_RETURN(ScoreResult r, Score(model, ids, t.shape[0], t.shape[1], options));
  model::SafetensorsWriter w;
  EM_RETURN_IF_ERROR(w.AddF32("logits", {r.batch, r.tokens, r.vocab}, r.logits));
  if (options.mtp) {
    EM_RETURN_IF_ERROR(
        w.AddF32("mtp_logits", {r.batch, options.prefill - 1, r.vocab}, r.mtp_logits));
  }
  return w.WriteFile(out);
}

}  // namespace expertmesh::engine
