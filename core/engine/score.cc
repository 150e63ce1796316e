#include "core/engine/score.h"

#include <algorithm>
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
  r.logits.assign(batch * tokens * V, 0.0f);
  if (o.mtp) r.mtp_logits.assign(batch * (o.prefill - 1) * V, 0.0f);
  const int64_t chunk = o.chunk > 0 ? o.chunk : o.prefill;
  // Sequences run one after another, or all together in every forward pass
  // (batch_sequences); batch invariance makes both give the same bytes.
  const int64_t group = o.batch_sequences ? batch : 1;
  for (int64_t b0 = 0; b0 < batch; b0 += group) {
    const int64_t nb = std::min(group, batch - b0);
    std::vector<model::SequenceState> st;
    for (int64_t i = 0; i < nb; ++i) st.push_back(model.NewState());
    auto seq_ids = [&](int64_t i) { return ids.data() + (b0 + i) * tokens; };
    auto out_row = [&](int64_t i, int64_t pos) {
      return r.logits.data() + ((b0 + i) * tokens + pos) * V;
    };
    model::ForwardOptions all;
    all.all_logits = true;
    for (int64_t p = 0; p < o.prefill; p += chunk) {
      const int64_t len = std::min(chunk, o.prefill - p);
      std::vector<model::Segment> segs;
      for (int64_t i = 0; i < nb; ++i) {
        segs.push_back({&st[i], absl::MakeConstSpan(seq_ids(i) + p, len)});
      }
      EM_ASSIGN_OR_RETURN(std::vector<float> l, model.Forward(segs, all));
      for (int64_t i = 0; i < nb; ++i) {
        std::copy(l.begin() + i * len * V, l.begin() + (i + 1) * len * V, out_row(i, p));
      }
      if (o.progress && chunk < o.prefill) {
        o.progress("sequences " + std::to_string(b0) + "+" + std::to_string(nb) + ": prefill " +
                   std::to_string(p + len) + "/" + std::to_string(o.prefill) + " tokens");
      }
    }
    for (int64_t p = o.prefill; p < tokens; ++p) {
      std::vector<model::Segment> segs;
      for (int64_t i = 0; i < nb; ++i) {
        segs.push_back({&st[i], absl::MakeConstSpan(seq_ids(i) + p, 1)});
      }
      EM_ASSIGN_OR_RETURN(std::vector<float> l, model.Forward(segs, {}));
      for (int64_t i = 0; i < nb; ++i) {
        std::copy(l.begin() + i * V, l.begin() + (i + 1) * V, out_row(i, p));
      }
      if (o.progress && (p - o.prefill + 1) % 100 == 0) {
        o.progress("sequences " + std::to_string(b0) + "+" + std::to_string(nb) + ": " +
                   std::to_string(p + 1) + "/" + std::to_string(tokens) + " tokens");
      }
    }
    if (o.mtp) {
      // A fresh trunk over the first N-1 tokens; MTP block 0 reads its final streams and the
      // next tokens (golden.json, mtp_logits).
      const int64_t n = o.prefill - 1;
      std::vector<model::SequenceState> ms;
      for (int64_t i = 0; i < nb; ++i) ms.push_back(model.NewState());
      std::vector<float> streams;
      model::ForwardOptions fo;
      fo.final_streams = &streams;
      std::vector<model::Segment> segs, msegs;
      for (int64_t i = 0; i < nb; ++i) {
        segs.push_back({&ms[i], absl::MakeConstSpan(seq_ids(i), n)});
        msegs.push_back({&ms[i], absl::MakeConstSpan(seq_ids(i) + 1, n)});
      }
      EM_RETURN_IF_ERROR(model.Forward(segs, fo).status());
      EM_ASSIGN_OR_RETURN(std::vector<float> l,
                          model.ForwardMtp(0, msegs, streams.data(), true));
      std::copy(l.begin(), l.end(), r.mtp_logits.begin() + b0 * n * V);
    }
    if (o.progress) {
      o.progress("sequence " + std::to_string(b0 + nb) + "/" + std::to_string(batch) + " done");
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
