// The DeepSeek-V4 weights as the forward pass uses them (MODEL.md, Checkpoint format): linear
// layers are kernels::WeightMatrix views into the memory-mapped checkpoint (never dequantized as
// a whole); only small vectors (norms, biases, ape, sinks, hc scale/base) are float32 copies.
// Routed experts can be loaded for a subset of (block, expert) pairs: an expert worker hosts a
// few of them, and the forward pass asks an ExpertExecutor for the rest.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/kernels/matmul.h"
#include "core/model/checkpoint.h"
#include "core/model/config.h"

namespace expertmesh::model {

struct CompressorWeights {
  int ratio = 0;                     // tokens per entry
  int width = 0;                     // c: entry width (d for attention, Id for the indexer)
  int coff = 1;                      // 2 when ratio == 4 (overlap), else 1
  bool rotate = false;               // indexer: Hadamard + FP4; attention: FP8 of the non-rope dims
  std::vector<float> ape;            // [ratio, coff*width]
  kernels::WeightMatrix wkv, wgate;  // [coff*width, D]
  std::vector<float> norm;           // [width]
};

struct IndexerWeights {
  kernels::WeightMatrix wq_b;          // [IH*Id, Q]
  kernels::WeightMatrix weights_proj;  // [IH, D]
  CompressorWeights compressor;
};

struct AttentionWeights {
  int ratio = 0;
  std::vector<float> attn_sink;                 // [H]
  kernels::WeightMatrix wq_a;                   // [Q, D]
  std::vector<float> q_norm;                    // [Q]
  kernels::WeightMatrix wq_b;                   // [H*d, Q]
  kernels::WeightMatrix wkv;                    // [d, D]
  std::vector<float> kv_norm;                   // [d]
  kernels::WeightMatrix wo_a;                   // [G*R, H*d/G]
  kernels::WeightMatrix wo_b;                   // [D, G*R]
  std::optional<CompressorWeights> compressor;  // ratio > 0
  std::optional<IndexerWeights> indexer;        // ratio == 4
};

// One SwiGLU expert (routed or shared): out = w2 (silu(w1 x) * w3 x).
struct ExpertWeights {
  kernels::WeightMatrix w1, w3;  // [I, D]
  kernels::WeightMatrix w2;      // [D, I]
};

struct MoeWeights {
  kernels::WeightMatrix gate;                         // [E, D]
  std::vector<float> bias;                            // [E], empty in hash layers
  absl::Span<const int32_t> tid2eid;                  // [V, k] in hash layers, else empty
  std::vector<std::optional<ExpertWeights>> experts;  // [E]; nullopt = not loaded here
  std::optional<ExpertWeights> shared;                // n_shared_experts > 0
};

struct HcWeights {
  kernels::WeightMatrix fn;  // [(2+Hc)*Hc, Hc*D] (or [Hc, Hc*D] for the head)
  std::vector<float> base;
  std::vector<float> scale;
};

struct BlockWeights {
  int block = 0;  // layer id (L + i for MTP block i)
  std::vector<float> attn_norm, ffn_norm;
  HcWeights hc_attn, hc_ffn;
  AttentionWeights attn;
  MoeWeights moe;
};

struct MtpWeights {
  BlockWeights block;
  kernels::WeightMatrix e_proj, h_proj;  // [D, D]
  std::vector<float> enorm, hnorm, norm;
  HcWeights hc_head;
};

struct ModelWeights {
  kernels::WeightMatrix embed;  // [V, D]
  kernels::WeightMatrix head;   // [V, D]
  std::vector<float> norm;
  HcWeights hc_head;
  std::vector<BlockWeights> layers;
  std::vector<MtpWeights> mtp;
};

struct LoadOptions {
  // Which routed experts to map: (block, expert) -> load? Null = all.
  std::function<bool(int block, int expert)> load_expert;
  bool load_mtp = true;
};

// Rows [r0, r0 + n) of `w` as a view of the same bytes, when the format allows a cut there
// (F32, BF16, FP4 anywhere; FP8 only at a multiple of its scale block rows). Returns false
// otherwise (the caller then multiplies by the whole matrix).
bool SliceRows(const kernels::WeightMatrix& w, int64_t r0, int64_t n, kernels::WeightMatrix* out);

// Loads views of every weight the forward pass needs. Errors: the Checkpoint's, naming the
// tensor (missing, wrong shape or dtype). The Checkpoint must outlive the result.
absl::StatusOr<ModelWeights> LoadModelWeights(const Checkpoint& ckpt, const LoadOptions& options);

// Bytes of every weight loaded (matrix codes and scales, norms, biases): what this process
// holds resident once the pages are touched.
uint64_t ResidentWeightBytes(const ModelWeights& w);

// One routed expert's weights (for an expert worker that hosts only some experts).
absl::StatusOr<ExpertWeights> LoadExpertWeights(const Checkpoint& ckpt, int block, int expert);

}  // namespace expertmesh::model
