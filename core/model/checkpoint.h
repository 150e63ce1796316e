// A DeepSeek-V4 checkpoint directory: config.json plus either `model.safetensors` or the shards
// named by `model.safetensors.index.json` (weight_map). Shards are mapped lazily, on the first
// access to one of their tensors, and tensors are never read or checksummed as a whole, so a
// process that loads a subset (some layers, some experts) touches only those pages: an expert
// worker serves a few experts out of a multi-hundred-GB checkpoint (MODEL.md, Checkpoint
// format; issue 4, Loading).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "core/kernels/matmul.h"
#include "core/model/config.h"
#include "core/model/safetensors.h"

namespace expertmesh::model {

// Tensor-name prefix of block `block` (0 <= block < config.NumBlocks()): "layers.{l}." for
// trunk layers, "mtp.{i}." for MTP block i = block - num_hidden_layers.
std::string BlockPrefix(const ModelConfig& config, int block);

// Thread-safe: all methods may be called concurrently (shard mapping is guarded).
// Views returned (TensorView, WeightMatrix, spans) stay valid as long as the Checkpoint lives.
class Checkpoint {
 public:
  // Reads `dir`/config.json (validated, see ParseModelConfig) and the tensor directory:
  // - with `model.safetensors.index.json`: its "weight_map" {tensor: shard file}; each shard
  //   file is opened on first use. Errors at Open: malformed index, an absolute shard path or
  //   one containing "..", a listed shard that does not exist (NotFound naming the shard and
  //   a tensor).
  // - else `model.safetensors`, opened now (it is needed anyway).
  // NotFound if neither exists.
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const ModelConfig& config() const { return config_; }
  const std::string& dir() const { return dir_; }

  // Whether the checkpoint names this tensor (index or single file). Maps nothing.
  bool Has(std::string_view name) const;
  // All tensor names, sorted.
  std::vector<std::string> Names() const;

  // The raw tensor (maps its shard if needed). Errors: NotFound "tensor 'x' not in checkpoint";
  // a shard's open/parse error annotated with the shard path; NotFound if the index maps the
  // tensor to a shard that does not contain it. Reads none of the tensor's bytes; its pages
  // come in as they are touched (one at a time: the mapping is MADV_RANDOM), so a caller that
  // will read a whole big tensor should use GetMatrix or PrefetchBytes.
  absl::StatusOr<TensorView> Get(std::string_view name) const;

  // A weight matrix [rows, cols] (y = W x) in its stored format, for kernels::MatMul:
  // - F32 or BF16 [rows, cols];
  // - F8_E4M3 [rows, cols] with sibling "<name minus 'weight'>scale", F8_E8M0 or F32, shape
  //   [ceil(rows/br), ceil(cols/bc)] (br x bc = config().weight_block_size);
  // - I8 (FP4 e2m1, two codes a byte) [rows, cols/2] with scale F8_E8M0 or F32 [rows, cols/32];
  //   requires cols % 32 == 0.
  // Errors (InvalidArgument unless NotFound; each names the tensor and says expected vs got):
  // missing tensor, missing scale, wrong weight or scale shape, unsupported weight or scale dtype.
  // Data that is not aligned to its element size in the file is copied once into memory owned
  // by the Checkpoint (safetensors does not align tensors); aligned data is used in place.
  // The weight's and scale's pages are prefetched (madvise WILLNEED), nothing else.
  absl::StatusOr<kernels::WeightMatrix> GetMatrix(std::string_view weight_name, int64_t rows,
                                                  int64_t cols) const;

  // A small float tensor (norm weights, biases, ape, attn_sink, hc params) converted to float32
  // (a copy). Accepts F32 and BF16. Errors: missing, shape != `shape`, other dtype.
  absl::StatusOr<std::vector<float>> GetFloats(std::string_view name,
                                               std::vector<int64_t> shape) const;

  // An I32 tensor (gate.tid2eid) of exactly `shape`. In place when aligned, else an owned copy.
  // Errors: missing, wrong shape, other dtype.
  absl::StatusOr<absl::Span<const int32_t>> GetInt32(std::string_view name,
                                                     std::vector<int64_t> shape) const;

  // Shard files mapped so far (tests and logs: a subset load maps only the shards it needs).
  std::vector<std::string> OpenedShards() const;
  // Number of shard files the checkpoint has (1 for a single model.safetensors).
  int NumShards() const { return static_cast<int>(shard_names_.size()); }

 private:
  Checkpoint() = default;
  // Maps shard `index` if not yet mapped. Errors: the shard's open/parse error.
  absl::StatusOr<const SafetensorsFile*> Shard(int index) const;
  // `view`'s bytes, or an owned copy aligned to `alignment` when they are not.
  const void* Aligned(const TensorView& view, size_t alignment) const;

  std::string dir_;
  ModelConfig config_;
  std::vector<std::string> shard_names_;                // file names relative to dir_
  absl::flat_hash_map<std::string, int> tensor_shard_;  // tensor -> index in shard_names_

  mutable absl::Mutex mu_;
  mutable std::vector<std::unique_ptr<SafetensorsFile>> shards_ ABSL_GUARDED_BY(mu_);
  // Aligned copies of misaligned tensors, by (data pointer, size): tensors may overlap or be
  // empty, so the pointer alone does not identify one. Node map: values never move.
  mutable absl::node_hash_map<std::pair<const void*, size_t>, std::vector<uint64_t>> aligned_copies_
      ABSL_GUARDED_BY(mu_);
};

// Checks that every tensor MODEL.md names for `ckpt.config()` is present with its shape and an
// accepted dtype (FP8/FP4 weights with their scales), for the trunk, every layer by its ratio
// (compressor, indexer), hash vs biased gates, every expert, the shared experts and the MTP
// blocks. Maps every shard and reads headers only (no tensor bytes). Errors: the first
// problem found, naming the tensor (InvalidArgument or NotFound).
absl::Status ValidateCheckpoint(const Checkpoint& ckpt);

}  // namespace expertmesh::model
