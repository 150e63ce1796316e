#include "core/model/checkpoint.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace expertmesh::model {
namespace {

constexpr char kSingleFile[] = "model.safetensors";
constexpr char kIndexFile[] = "model.safetensors.index.json";

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

absl::Status ShapeError(std::string_view name, std::string_view what,
                        const std::vector<int64_t>& expected, const std::vector<int64_t>& got) {
  return absl::InvalidArgumentError(absl::StrCat("tensor '", std::string(name), "': expected ",
                                                 std::string(what), "shape ", ShapeString(expected),
                                                 ", got ", ShapeString(got)));
}

absl::Status DTypeError(std::string_view name, std::string_view expected, DType got) {
  return absl::InvalidArgumentError(absl::StrCat("tensor '", std::string(name),
                                                 "': expected dtype ", std::string(expected),
                                                 ", got ", std::string(DTypeName(got))));
}

// The raw views behind a WeightMatrix (the scale only for quantized formats).
struct MatrixViews {
  TensorView weight;
  std::optional<TensorView> scale;
};

}  // namespace

std::string BlockPrefix(const ModelConfig& config, int block) {
  if (block < config.num_hidden_layers) return absl::StrCat("layers.", block, ".");
  return absl::StrCat("mtp.", block - config.num_hidden_layers, ".");
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->dir_ = dir;
  EM_ASSIGN_OR_RETURN(ckpt->config_, LoadModelConfig(dir));

  const std::string index_path = dir + "/" + kIndexFile;
  const std::string single_path = dir + "/" + kSingleFile;
  if (FileExists(index_path)) {
    EM_ASSIGN_OR_RETURN(std::string text, base::ReadFileToString(index_path));
    auto bad = [&](std::string_view what) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": ", std::string(what)));
    };
    nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return bad("malformed JSON");
    if (!j.is_object()) return bad("top level is not an object");
    auto wm = j.find("weight_map");
    if (wm == j.end() || !wm->is_object()) return bad("missing or non-object 'weight_map'");
    absl::flat_hash_map<std::string, int> shard_index;
    std::vector<std::string> first_tensor;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) {
        return bad(absl::StrCat("weight_map entry of tensor '", it.key(), "' is not a string"));
      }
      std::string shard = it.value().get<std::string>();
      if (shard.empty() || shard[0] == '/' || absl::StrContains(shard, "..")) {
        return bad(absl::StrCat("tensor '", it.key(), "' maps to shard '", shard,
                                "', which is not a file name inside the checkpoint directory"));
      }
      auto [pos, inserted] =
          shard_index.try_emplace(shard, static_cast<int>(ckpt->shard_names_.size()));
      if (inserted) {
        ckpt->shard_names_.push_back(shard);
        first_tensor.push_back(it.key());
      }
      ckpt->tensor_shard_[it.key()] = pos->second;
    }
    // A missing shard is found now (a stat, no mapping), not when a worker first needs it.
    for (size_t i = 0; i < ckpt->shard_names_.size(); ++i) {
      if (!FileExists(dir + "/" + ckpt->shard_names_[i])) {
        return absl::NotFoundError(absl::StrCat(index_path, ": shard '", ckpt->shard_names_[i],
                                                "' (holding tensor '", first_tensor[i],
                                                "') does not exist"));
      }
    }
    absl::MutexLock lock(&ckpt->mu_);
    ckpt->shards_.resize(ckpt->shard_names_.size());
  } else if (FileExists(single_path)) {
    auto file = SafetensorsFile::Open(single_path);
    if (!file.ok()) return file.status();
    ckpt->shard_names_.push_back(kSingleFile);
    for (const std::string& name : (*file)->Names()) ckpt->tensor_shard_[name] = 0;
    absl::MutexLock lock(&ckpt->mu_);
    ckpt->shards_.push_back(std::move(*file));
  } else {
    return absl::NotFoundError(
        absl::StrCat(dir, ": neither ", kSingleFile, " nor ", kIndexFile, " exists"));
  }
  return ckpt;
}

bool Checkpoint::Has(std::string_view name) const {
  return tensor_shard_.contains(std::string(name));
}

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  names.reserve(tensor_shard_.size());
  for (const auto& [name, shard] : tensor_shard_) names.push_back(name);
  std::sort(names.begin(), names.end());
  return names;
}

absl::StatusOr<const SafetensorsFile*> Checkpoint::Shard(int index) const {
  absl::MutexLock lock(&mu_);
  std::unique_ptr<SafetensorsFile>& slot = shards_[static_cast<size_t>(index)];
  if (slot == nullptr) {
    auto file = SafetensorsFile::Open(dir_ + "/" + shard_names_[static_cast<size_t>(index)]);
    if (!file.ok()) return file.status();
    slot = std::move(*file);
  }
  return slot.get();
}

std::vector<std::string> Checkpoint::OpenedShards() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  for (size_t i = 0; i < shards_.size(); ++i) {
    if (shards_[i] != nullptr) out.push_back(shard_names_[i]);
  }
  return out;
}

absl::StatusOr<TensorView> Checkpoint::Get(std::string_view name) const {
  auto it = tensor_shard_.find(std::string(name));
  if (it == tensor_shard_.end()) {
    return absl::NotFoundError(
        absl::StrCat("tensor '", std::string(name), "' not in checkpoint ", dir_));
  }
  EM_ASSIGN_OR_RETURN(const SafetensorsFile* file, Shard(it->second));
  auto view = file->Get(name);
  if (!view.ok() && absl::IsNotFound(view.status())) {
    return absl::NotFoundError(absl::StrCat("tensor '", std::string(name), "' is mapped to shard '",
                                            shard_names_[static_cast<size_t>(it->second)], "' by ",
                                            kIndexFile, " but that shard lacks it"));
  }
  return view;
}

const void* Checkpoint::Aligned(const TensorView& view, size_t alignment) const {
  if (view.nbytes == 0 || reinterpret_cast<uintptr_t>(view.data) % alignment == 0) {
    return view.data;
  }
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = aligned_copies_.try_emplace(std::make_pair(view.data, view.nbytes));
  if (inserted) {
    it->second.resize((view.nbytes + sizeof(uint64_t) - 1) / sizeof(uint64_t));
    if (view.nbytes > 0) std::memcpy(it->second.data(), view.data, view.nbytes);
  }
  return it->second.data();
}

namespace {

// The shape/dtype part of GetMatrix, touching no tensor bytes: returns a WeightMatrix pointing
// into the mapping (possibly misaligned) and the views it was built from.
absl::StatusOr<kernels::WeightMatrix> CheckMatrix(const Checkpoint& ckpt,
                                                  std::string_view weight_name, int64_t rows,
                                                  int64_t cols, MatrixViews* views) {
  EM_ASSIGN_OR_RETURN(views->weight, ckpt.Get(weight_name));
  const TensorView& w = views->weight;
  kernels::WeightMatrix m;
  m.rows = rows;
  m.cols = cols;
  m.data = w.data;
  const std::vector<int64_t> full = {rows, cols};
  std::vector<int64_t> scale_shape;
  switch (w.dtype) {
    case DType::kF32:
    case DType::kBF16:
      if (w.shape != full) return ShapeError(weight_name, "", full, w.shape);
      m.format =
          w.dtype == DType::kF32 ? kernels::WeightFormat::kF32 : kernels::WeightFormat::kBF16;
      m.scale_format = kernels::ScaleFormat::kNone;
      return m;
    case DType::kF8E4M3: {
      if (w.shape != full) return ShapeError(weight_name, "", full, w.shape);
      const WeightBlockSize& b = ckpt.config().weight_block_size;
      m.format = kernels::WeightFormat::kFP8E4M3;
      m.block_rows = b.rows;
      m.block_cols = b.cols;
      scale_shape = {CeilDiv(rows, b.rows), CeilDiv(cols, b.cols)};
      break;
    }
    case DType::kI8: {
      if (cols % 32 != 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor '", std::string(weight_name),
                         "': FP4 (I8) weight needs cols % 32 == 0, got ", cols, " cols"));
      }
      const std::vector<int64_t> packed = {rows, cols / 2};
      if (w.shape != packed) return ShapeError(weight_name, "FP4-packed I8 ", packed, w.shape);
      m.format = kernels::WeightFormat::kFP4E2M1;
      scale_shape = {rows, cols / 32};
      break;
    }
    default:
      return DTypeError(weight_name, "F32, BF16, F8_E4M3 or I8 (FP4) for a weight matrix", w.dtype);
  }
  if (!weight_name.ends_with("weight")) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", std::string(weight_name),
                                                   "': a quantized weight's name must end in "
                                                   "'weight' to find its scale"));
  }
  const std::string scale_name =
      absl::StrCat(std::string(weight_name.substr(0, weight_name.size() - 6)), "scale");
  if (!ckpt.Has(scale_name)) {
    return absl::NotFoundError(absl::StrCat("tensor '", std::string(weight_name), "' (",
                                            std::string(DTypeName(w.dtype)),
                                            ") has no scale tensor '", scale_name, "'"));
  }
  EM_ASSIGN_OR_RETURN(TensorView s, ckpt.Get(scale_name));
  if (s.dtype == DType::kF8E8M0) {
    m.scale_format = kernels::ScaleFormat::kE8M0;
  } else if (s.dtype == DType::kF32) {
    m.scale_format = kernels::ScaleFormat::kF32;
  } else {
    return DTypeError(scale_name, "F8_E8M0 or F32 for a scale", s.dtype);
  }
  if (s.shape != scale_shape) return ShapeError(scale_name, "scale ", scale_shape, s.shape);
  m.scales = s.data;
  views->scale = std::move(s);
  return m;
}

size_t ElementAlignment(DType d) { return d == DType::kF32 ? 4 : d == DType::kBF16 ? 2 : 1; }

}  // namespace

absl::StatusOr<kernels::WeightMatrix> Checkpoint::GetMatrix(std::string_view weight_name,
                                                            int64_t rows, int64_t cols) const {
  MatrixViews views;
  EM_ASSIGN_OR_RETURN(kernels::WeightMatrix m, CheckMatrix(*this, weight_name, rows, cols, &views));
  // The caller is about to use the whole matrix: read it in one go (the mapping is MADV_RANDOM).
  PrefetchBytes(views.weight.data, views.weight.nbytes);
  m.data = Aligned(views.weight, ElementAlignment(views.weight.dtype));
  if (views.scale.has_value()) {
    PrefetchBytes(views.scale->data, views.scale->nbytes);
    m.scales = Aligned(*views.scale, ElementAlignment(views.scale->dtype));
  }
  return m;
}

absl::StatusOr<std::vector<float>> Checkpoint::GetFloats(std::string_view name,
                                                         std::vector<int64_t> shape) const {
  EM_ASSIGN_OR_RETURN(TensorView v, Get(name));
  if (v.dtype != DType::kF32 && v.dtype != DType::kBF16)
    return DTypeError(name, "F32 or BF16", v.dtype);
  if (v.shape != shape) return ShapeError(name, "", shape, v.shape);
  const size_t n = static_cast<size_t>(NumElements(shape));
  std::vector<float> out(n);
  if (v.dtype == DType::kF32) {
    if (n > 0) std::memcpy(out.data(), v.data, n * sizeof(float));
  } else {
    for (size_t i = 0; i < n; ++i) {
      uint32_t bits =
          static_cast<uint32_t>(v.data[2 * i]) | (static_cast<uint32_t>(v.data[2 * i + 1]) << 8);
      bits <<= 16;
      std::memcpy(&out[i], &bits, sizeof(float));
    }
  }
  return out;
}

absl::StatusOr<absl::Span<const int32_t>> Checkpoint::GetInt32(std::string_view name,
                                                               std::vector<int64_t> shape) const {
  EM_ASSIGN_OR_RETURN(TensorView v, Get(name));
  if (v.dtype != DType::kI32) return DTypeError(name, "I32", v.dtype);
  if (v.shape != shape) return ShapeError(name, "", shape, v.shape);
  const int32_t* p = static_cast<const int32_t*>(Aligned(v, sizeof(int32_t)));
  return absl::Span<const int32_t>(p, static_cast<size_t>(NumElements(shape)));
}

namespace {

class Validator {
 public:
  explicit Validator(const Checkpoint& ckpt) : ckpt_(ckpt), c_(ckpt.config()) {}

  absl::Status Matrix(const std::string& name, int64_t rows, int64_t cols) {
    MatrixViews views;
    return CheckMatrix(ckpt_, name, rows, cols, &views).status();
  }
  absl::Status Expert(const std::string& name, int64_t rows, int64_t cols) {
    MatrixViews views;
    EM_RETURN_IF_ERROR(CheckMatrix(ckpt_, name, rows, cols, &views).status());
    const DType want = c_.expert_dtype == ExpertDType::kFP4 ? DType::kI8 : DType::kF8E4M3;
    if (views.weight.dtype != want) {
      return DTypeError(name,
                        c_.expert_dtype == ExpertDType::kFP4
                            ? "I8 (FP4, as config expert_dtype says)"
                            : "F8_E4M3 (as config expert_dtype says)",
                        views.weight.dtype);
    }
    return absl::OkStatus();
  }
  absl::Status Floats(const std::string& name, std::vector<int64_t> shape) {
    EM_ASSIGN_OR_RETURN(TensorView v, ckpt_.Get(name));
    if (v.dtype != DType::kF32 && v.dtype != DType::kBF16) {
      return DTypeError(name, "F32 or BF16", v.dtype);
    }
    if (v.shape != shape) return ShapeError(name, "", shape, v.shape);
    return absl::OkStatus();
  }
  // tid2eid is read (V*k ints): an out-of-range expert id would index out of bounds later.
  absl::Status Tid2Eid(const std::string& name) {
    EM_ASSIGN_OR_RETURN(absl::Span<const int32_t> ids,
                        ckpt_.GetInt32(name, {c_.vocab_size, c_.num_experts_per_tok}));
    for (size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] < 0 || ids[i] >= c_.n_routed_experts) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor '", name, "': token ", i / c_.num_experts_per_tok,
                         " maps to expert ", ids[i], ", outside [0, ", c_.n_routed_experts, ")"));
      }
    }
    return absl::OkStatus();
  }

  absl::Status HcHead(const std::string& p) {
    const int64_t hc = c_.hc_mult, d = c_.hidden_size;
    EM_RETURN_IF_ERROR(Floats(p + "hc_head_fn", {hc, hc * d}));
    EM_RETURN_IF_ERROR(Floats(p + "hc_head_base", {hc}));
    return Floats(p + "hc_head_scale", {1});
  }

  absl::Status Block(int b) {
    const std::string p = BlockPrefix(c_, b);
    const int64_t D = c_.hidden_size, hc = c_.hc_mult, H = c_.num_attention_heads;
    const int64_t d = c_.head_dim, Q = c_.q_lora_rank, G = c_.o_groups, R = c_.o_lora_rank;
    const int64_t mix = (2 + hc) * hc;
    EM_RETURN_IF_ERROR(Floats(p + "attn_norm.weight", {D}));
    EM_RETURN_IF_ERROR(Floats(p + "ffn_norm.weight", {D}));
    for (const char* which : {"attn", "ffn"}) {
      EM_RETURN_IF_ERROR(Floats(absl::StrCat(p, "hc_", which, "_fn"), {mix, hc * D}));
      EM_RETURN_IF_ERROR(Floats(absl::StrCat(p, "hc_", which, "_base"), {mix}));
      EM_RETURN_IF_ERROR(Floats(absl::StrCat(p, "hc_", which, "_scale"), {3}));
    }
    const std::string a = p + "attn.";
    EM_RETURN_IF_ERROR(Floats(a + "attn_sink", {H}));
    EM_RETURN_IF_ERROR(Matrix(a + "wq_a.weight", Q, D));
    EM_RETURN_IF_ERROR(Floats(a + "q_norm.weight", {Q}));
    EM_RETURN_IF_ERROR(Matrix(a + "wq_b.weight", H * d, Q));
    EM_RETURN_IF_ERROR(Matrix(a + "wkv.weight", d, D));
    EM_RETURN_IF_ERROR(Floats(a + "kv_norm.weight", {d}));
    EM_RETURN_IF_ERROR(Matrix(a + "wo_a.weight", G * R, H * d / G));
    EM_RETURN_IF_ERROR(Matrix(a + "wo_b.weight", D, G * R));
    const int ratio = c_.CompressRatio(b);
    if (ratio > 0) {
      EM_RETURN_IF_ERROR(Compressor(a + "compressor.", ratio, d));
    }
    if (ratio == 4) {
      const int64_t ih = c_.index_n_heads, id = c_.index_head_dim;
      EM_RETURN_IF_ERROR(Matrix(a + "indexer.wq_b.weight", ih * id, Q));
      EM_RETURN_IF_ERROR(Matrix(a + "indexer.weights_proj.weight", ih, D));
      EM_RETURN_IF_ERROR(Compressor(a + "indexer.compressor.", 4, id));
    }
    const std::string f = p + "ffn.";
    const int64_t E = c_.n_routed_experts, I = c_.moe_intermediate_size;
    EM_RETURN_IF_ERROR(Matrix(f + "gate.weight", E, D));
    if (c_.IsHashLayer(b)) {
      EM_RETURN_IF_ERROR(Tid2Eid(f + "gate.tid2eid"));
    } else {
      EM_RETURN_IF_ERROR(Floats(f + "gate.bias", {E}));
    }
    for (int64_t e = 0; e < E; ++e) {
      const std::string x = absl::StrCat(f, "experts.", e, ".");
      EM_RETURN_IF_ERROR(Expert(x + "w1.weight", I, D));
      EM_RETURN_IF_ERROR(Expert(x + "w3.weight", I, D));
      EM_RETURN_IF_ERROR(Expert(x + "w2.weight", D, I));
    }
    if (c_.n_shared_experts > 0) {
      const int64_t si = I * c_.n_shared_experts;
      EM_RETURN_IF_ERROR(Matrix(f + "shared_experts.w1.weight", si, D));
      EM_RETURN_IF_ERROR(Matrix(f + "shared_experts.w3.weight", si, D));
      EM_RETURN_IF_ERROR(Matrix(f + "shared_experts.w2.weight", D, si));
    }
    if (b >= c_.num_hidden_layers) {
      EM_RETURN_IF_ERROR(Matrix(p + "e_proj.weight", D, D));
      EM_RETURN_IF_ERROR(Matrix(p + "h_proj.weight", D, D));
      EM_RETURN_IF_ERROR(Floats(p + "enorm.weight", {D}));
      EM_RETURN_IF_ERROR(Floats(p + "hnorm.weight", {D}));
      EM_RETURN_IF_ERROR(Floats(p + "norm.weight", {D}));
      EM_RETURN_IF_ERROR(HcHead(p));
      // Released checkpoints also store the (shared) embedding and head under the MTP prefix.
      if (ckpt_.Has(p + "embed.weight")) {
        EM_RETURN_IF_ERROR(Matrix(p + "embed.weight", c_.vocab_size, D));
      }
      if (ckpt_.Has(p + "head.weight")) {
        EM_RETURN_IF_ERROR(Matrix(p + "head.weight", c_.vocab_size, D));
      }
    }
    return absl::OkStatus();
  }

  absl::Status Compressor(const std::string& p, int ratio, int64_t width) {
    const int64_t coff = ratio == 4 ? 2 : 1;
    EM_RETURN_IF_ERROR(Floats(p + "ape", {ratio, coff * width}));
    EM_RETURN_IF_ERROR(Matrix(p + "wkv.weight", coff * width, c_.hidden_size));
    EM_RETURN_IF_ERROR(Matrix(p + "wgate.weight", coff * width, c_.hidden_size));
    return Floats(p + "norm.weight", {width});
  }

  absl::Status All() {
    EM_RETURN_IF_ERROR(Matrix("embed.weight", c_.vocab_size, c_.hidden_size));
    EM_RETURN_IF_ERROR(Matrix("head.weight", c_.vocab_size, c_.hidden_size));
    EM_RETURN_IF_ERROR(Floats("norm.weight", {c_.hidden_size}));
    EM_RETURN_IF_ERROR(HcHead(""));
    for (int b = 0; b < c_.NumBlocks(); ++b) EM_RETURN_IF_ERROR(Block(b));
    return absl::OkStatus();
  }

 private:
  const Checkpoint& ckpt_;
  const ModelConfig& c_;
};

}  // namespace

absl::Status ValidateCheckpoint(const Checkpoint& ckpt) { return Validator(ckpt).All(); }

}  // namespace expertmesh::model
