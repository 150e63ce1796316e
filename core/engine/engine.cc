#include "core/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>

#include "core/base/clock.h"
#include "core/base/hash.h"
#include "core/base/status_macros.h"

namespace expertmesh::engine {

namespace {

// Candidate tokens by decreasing logit (ties: lower id first): the first `keep` of them sorted.
std::vector<int32_t> TopIds(absl::Span<const float> logits, int64_t keep) {
  const int64_t V = static_cast<int64_t>(logits.size());
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), by_logit);
  order.resize(keep);
  return order;
}

// log sum_i exp(logits[i]), in double, summed in index order.
double LogSumExp(absl::Span<const float> logits) {
  double mx = -std::numeric_limits<double>::infinity();
  for (float l : logits) mx = std::max(mx, static_cast<double>(l));
  if (!std::isfinite(mx)) return mx;
  double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<double>(l) - mx);
  return mx + std::log(sum);
}

}  // namespace

int32_t ArgMax(absl::Span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

double KeyedUniform(uint64_t seed, uint64_t choice_index, int64_t position) {
  // Each key is folded in through a full mixing round, with distinct odd offsets so that
  // (a, b, c) and its permutations land on unrelated states.
  uint64_t h = base::Mix64(seed + base::kSplitMix64Gamma);
  h = base::Mix64(h ^ (choice_index + 0xD1B54A32D192ED03ull));
  h = base::Mix64(h ^ (static_cast<uint64_t>(position) + 0x8CB92BA72F3D8DD7ull));
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

int32_t SampleToken(absl::Span<const float> logits, const SamplingParams& params,
                    uint64_t choice_index, int64_t position) {
  if (params.temperature <= 0.0) return ArgMax(logits);
  const int64_t V = static_cast<int64_t>(logits.size());
  int64_t keep = params.top_k > 0 ? std::min<int64_t>(params.top_k, V) : V;
  const std::vector<int32_t> order = TopIds(logits, keep);
  const double t = params.temperature;
  const double mx = logits[order[0]];
  std::vector<double> p(keep);
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) sum += (p[i] = std::exp((logits[order[i]] - mx) / t));
  for (double& v : p) v /= sum;
  if (params.top_p < 1.0) {
    double mass = 0;
    int64_t n = 0;
    while (n < keep && mass < params.top_p) mass += p[n++];
    keep = std::max<int64_t>(n, 1);
    p.resize(keep);
    sum = std::accumulate(p.begin(), p.end(), 0.0);
    for (double& v : p) v /= sum;
  }
  const double u = KeyedUniform(params.seed, choice_index, position);
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += p[i];
    if (u < acc) return order[i];
  }
  return order[keep - 1];
}

std::vector<std::pair<int32_t, float>> TopLogprobs(absl::Span<const float> logits, int n) {
  const int64_t keep = std::clamp<int64_t>(n, 0, static_cast<int64_t>(logits.size()));
  std::vector<std::pair<int32_t, float>> out;
  if (keep == 0) return out;
  const double lse = LogSumExp(logits);
  for (int32_t id : TopIds(logits, keep)) {
    out.emplace_back(id, static_cast<float>(static_cast<double>(logits[id]) - lse));
  }
  return out;
}

float TokenLogprob(absl::Span<const float> logits, int32_t token) {
  return static_cast<float>(static_cast<double>(logits[token]) - LogSumExp(logits));
}

SequenceId Engine::AddSequence() { return AddSequence(model_->NewState()); }

SequenceId Engine::AddSequence(model::SequenceState state) {
  const SequenceId id = next_id_++;
  seqs_[id] = std::make_unique<model::SequenceState>(std::move(state));
  return id;
}

absl::Status Engine::RemoveSequence(SequenceId id) {
  if (seqs_.erase(id) == 0) {
    return absl::NotFoundError("sequence " + std::to_string(id) + " not found");
  }
  return absl::OkStatus();
}

absl::StatusOr<model::SequenceState*> Engine::Find(SequenceId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end())
    return absl::NotFoundError("sequence " + std::to_string(id) + " not found");
  return it->second.get();
}

absl::StatusOr<const model::SequenceState*> Engine::State(SequenceId id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end())
    return absl::NotFoundError("sequence " + std::to_string(id) + " not found");
  return it->second.get();
}

absl::StatusOr<std::vector<float>> Engine::Prefill(SequenceId id, absl::Span<const int32_t> tokens,
                                                   int64_t chunk) {
  EM_ASSIGN_OR_RETURN(model::SequenceState * st, Find(id));
  if (tokens.empty()) return absl::InvalidArgumentError("prefill: no tokens");
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (chunk <= 0) chunk = n;
  std::vector<float> logits;
  for (int64_t p = 0; p < n; p += chunk) {
    model::Segment s{st, tokens.subspan(p, std::min(chunk, n - p))};
    EM_ASSIGN_OR_RETURN(logits, model_->Forward({&s, 1}, {}));
  }
  return logits;
}

absl::StatusOr<std::vector<float>> Engine::Step(
    absl::Span<const SequenceId> ids, absl::Span<const absl::Span<const int32_t>> tokens) {
  if (ids.size() != tokens.size() || ids.empty()) {
    return absl::InvalidArgumentError("step: need one token run per sequence");
  }
  std::set<SequenceId> seen;
  std::vector<model::Segment> segs;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!seen.insert(ids[i]).second) {
      return absl::InvalidArgumentError("step: sequence " + std::to_string(ids[i]) +
                                        " appears twice in one step");
    }
    if (tokens[i].empty()) {
      return absl::InvalidArgumentError("step: no tokens for sequence " + std::to_string(ids[i]));
    }
    EM_ASSIGN_OR_RETURN(model::SequenceState * st, Find(ids[i]));
    segs.push_back({st, tokens[i]});
  }
  return model_->Forward(segs, {});
}

absl::StatusOr<std::vector<float>> Engine::Decode(absl::Span<const SequenceId> ids,
                                                  absl::Span<const int32_t> tokens) {
  if (ids.size() != tokens.size()) {
    return absl::InvalidArgumentError("decode: need one token per sequence");
  }
  std::vector<absl::Span<const int32_t>> runs;
  for (size_t i = 0; i < tokens.size(); ++i) runs.push_back(tokens.subspan(i, 1));
  return Step(ids, runs);
}

absl::StatusOr<Generation> Generate(model::Model& model, absl::Span<const int32_t> prompt,
                                    int64_t max_new, const SamplingParams& params, int64_t chunk,
                                    int32_t stop_id) {
  Engine engine(&model);
  Generation g;
  g.prompt_tokens = static_cast<int64_t>(prompt.size());
  const SequenceId id = engine.AddSequence();
  base::Stopwatch phase;
  EM_ASSIGN_OR_RETURN(std::vector<float> logits, engine.Prefill(id, prompt, chunk));
  g.prefill_seconds = phase.Seconds();
  phase.Restart();
  EM_ASSIGN_OR_RETURN(const model::SequenceState* state, engine.State(id));
  for (int64_t i = 0; i < max_new; ++i) {
    // The state's position is the number of tokens fed so far: the sampled token's position.
    const int32_t next = SampleToken(logits, params, /*choice_index=*/0, state->position);
    g.ids.push_back(next);
    if (next == stop_id || i + 1 == max_new) break;
    const SequenceId ids[1] = {id};
    const int32_t toks[1] = {next};
    EM_ASSIGN_OR_RETURN(logits, engine.Decode(ids, toks));
  }
  g.decode_seconds = phase.Seconds();
  return g;
}

}  // namespace expertmesh::engine
