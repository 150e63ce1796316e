#include "core/model/weights.h"

#include <string>

#include "core/base/status_macros.h"

namespace expertmesh::model {
namespace {

using kernels::WeightMatrix;

class Loader {
 public:
  explicit Loader(const Checkpoint& ckpt) : ckpt_(ckpt), c_(ckpt.config()) {}

  absl::StatusOr<CompressorWeights> Compressor(const std::string& p, int ratio, int width,
                                               bool rotate) {
    CompressorWeights w;
    w.ratio = ratio;
    w.width = width;
    w.coff = ratio == 4 ? 2 : 1;
    w.rotate = rotate;
    const int64_t D = c_.hidden_size;
    EM_ASSIGN_OR_RETURN(w.ape, ckpt_.GetFloats(p + "ape", {ratio, w.coff * width}));
    EM_ASSIGN_OR_RETURN(w.wkv, ckpt_.GetMatrix(p + "wkv.weight", w.coff * width, D));
    EM_ASSIGN_OR_RETURN(w.wgate, ckpt_.GetMatrix(p + "wgate.weight", w.coff * width, D));
    EM_ASSIGN_OR_RETURN(w.norm, ckpt_.GetFloats(p + "norm.weight", {width}));
    return w;
  }

  absl::StatusOr<AttentionWeights> Attention(const std::string& p, int ratio) {
    AttentionWeights w;
    w.ratio = ratio;
    const int64_t D = c_.hidden_size, H = c_.num_attention_heads, d = c_.head_dim;
    const int64_t Q = c_.q_lora_rank, G = c_.o_groups, R = c_.o_lora_rank;
    EM_ASSIGN_OR_RETURN(w.attn_sink, ckpt_.GetFloats(p + "attn_sink", {H}));
    EM_ASSIGN_OR_RETURN(w.wq_a, ckpt_.GetMatrix(p + "wq_a.weight", Q, D));
    EM_ASSIGN_OR_RETURN(w.q_norm, ckpt_.GetFloats(p + "q_norm.weight", {Q}));
    EM_ASSIGN_OR_RETURN(w.wq_b, ckpt_.GetMatrix(p + "wq_b.weight", H * d, Q));
    EM_ASSIGN_OR_RETURN(w.wkv, ckpt_.GetMatrix(p + "wkv.weight", d, D));
    EM_ASSIGN_OR_RETURN(w.kv_norm, ckpt_.GetFloats(p + "kv_norm.weight", {d}));
    EM_ASSIGN_OR_RETURN(w.wo_a, ckpt_.GetMatrix(p + "wo_a.weight", G * R, H * d / G));
    EM_ASSIGN_OR_RETURN(w.wo_b, ckpt_.GetMatrix(p + "wo_b.weight", D, G * R));
    if (ratio > 0) {
      EM_ASSIGN_OR_RETURN(w.compressor,
                          Compressor(p + "compressor.", ratio, static_cast<int>(d), false));
    }
    if (ratio == 4) {
      IndexerWeights iw;
      const int64_t IH = c_.index_n_heads, Id = c_.index_head_dim;
      EM_ASSIGN_OR_RETURN(iw.wq_b, ckpt_.GetMatrix(p + "indexer.wq_b.weight", IH * Id, Q));
      EM_ASSIGN_OR_RETURN(iw.weights_proj,
                          ckpt_.GetMatrix(p + "indexer.weights_proj.weight", IH, D));
      EM_ASSIGN_OR_RETURN(iw.compressor,
                          Compressor(p + "indexer.compressor.", ratio, static_cast<int>(Id), true));
      w.indexer = std::move(iw);
    }
    return w;
  }

  absl::StatusOr<ExpertWeights> Expert(const std::string& p, int64_t inter) {
    ExpertWeights w;
    const int64_t D = c_.hidden_size;
    EM_ASSIGN_OR_RETURN(w.w1, ckpt_.GetMatrix(p + "w1.weight", inter, D));
    EM_ASSIGN_OR_RETURN(w.w3, ckpt_.GetMatrix(p + "w3.weight", inter, D));
    EM_ASSIGN_OR_RETURN(w.w2, ckpt_.GetMatrix(p + "w2.weight", D, inter));
    return w;
  }

  absl::StatusOr<HcWeights> HcParams(const std::string& fn, const std::string& base,
                                     const std::string& scale, int64_t rows, int64_t nscale) {
    HcWeights w;
    const int64_t Hc = c_.hc_mult;
    EM_ASSIGN_OR_RETURN(w.fn, ckpt_.GetMatrix(fn, rows, Hc * c_.hidden_size));
    EM_ASSIGN_OR_RETURN(w.base, ckpt_.GetFloats(base, {rows}));
    EM_ASSIGN_OR_RETURN(w.scale, ckpt_.GetFloats(scale, {nscale}));
    return w;
  }

  absl::StatusOr<BlockWeights> Block(int block, const LoadOptions& options) {
    BlockWeights w;
    w.block = block;
    const std::string p = BlockPrefix(c_, block);
    const int64_t D = c_.hidden_size, Hc = c_.hc_mult, E = c_.n_routed_experts;
    EM_ASSIGN_OR_RETURN(w.attn_norm, ckpt_.GetFloats(p + "attn_norm.weight", {D}));
    EM_ASSIGN_OR_RETURN(w.ffn_norm, ckpt_.GetFloats(p + "ffn_norm.weight", {D}));
    EM_ASSIGN_OR_RETURN(w.hc_attn, HcParams(p + "hc_attn_fn", p + "hc_attn_base",
                                            p + "hc_attn_scale", (2 + Hc) * Hc, 3));
    EM_ASSIGN_OR_RETURN(w.hc_ffn, HcParams(p + "hc_ffn_fn", p + "hc_ffn_base", p + "hc_ffn_scale",
                                           (2 + Hc) * Hc, 3));
    EM_ASSIGN_OR_RETURN(w.attn, Attention(p + "attn.", c_.CompressRatio(block)));
    MoeWeights& m = w.moe;
    EM_ASSIGN_OR_RETURN(m.gate, ckpt_.GetMatrix(p + "ffn.gate.weight", E, D));
    if (c_.IsHashLayer(block)) {
      EM_ASSIGN_OR_RETURN(m.tid2eid, ckpt_.GetInt32(p + "ffn.gate.tid2eid",
                                                    {c_.vocab_size, c_.num_experts_per_tok}));
    } else {
      EM_ASSIGN_OR_RETURN(m.bias, ckpt_.GetFloats(p + "ffn.gate.bias", {E}));
    }
    m.experts.resize(E);
    for (int e = 0; e < E; ++e) {
      if (options.load_expert && !options.load_expert(block, e)) continue;
      EM_ASSIGN_OR_RETURN(m.experts[e], Expert(p + "ffn.experts." + std::to_string(e) + ".",
                                               c_.moe_intermediate_size));
    }
    if (c_.n_shared_experts > 0) {
      EM_ASSIGN_OR_RETURN(m.shared, Expert(p + "ffn.shared_experts.",
                                           c_.moe_intermediate_size * c_.n_shared_experts));
    }
    return w;
  }

  absl::StatusOr<ModelWeights> Model(const LoadOptions& options) {
    ModelWeights w;
    const int64_t D = c_.hidden_size, V = c_.vocab_size, Hc = c_.hc_mult;
    // The reference ties the MTP blocks' embed/head to the trunk's and loads the checkpoint
    // into the tied parameters in module order, so the last MTP block's copy is what both the
    // trunk and the MTP blocks use (the golden confirms it; docs/model.md).
    std::string embed_name = "embed.weight", head_name = "head.weight";
    for (int i = 0; i < c_.num_nextn_predict_layers; ++i) {
      const std::string p = BlockPrefix(c_, c_.num_hidden_layers + i);
      if (ckpt_.Has(p + "embed.weight")) embed_name = p + "embed.weight";
      if (ckpt_.Has(p + "head.weight")) head_name = p + "head.weight";
    }
    EM_ASSIGN_OR_RETURN(w.embed, ckpt_.GetMatrix(embed_name, V, D));
    EM_ASSIGN_OR_RETURN(w.head, ckpt_.GetMatrix(head_name, V, D));
    EM_ASSIGN_OR_RETURN(w.norm, ckpt_.GetFloats("norm.weight", {D}));
    EM_ASSIGN_OR_RETURN(w.hc_head, HcParams("hc_head_fn", "hc_head_base", "hc_head_scale", Hc, 1));
    for (int l = 0; l < c_.num_hidden_layers; ++l) {
      EM_ASSIGN_OR_RETURN(BlockWeights b, Block(l, options));
      w.layers.push_back(std::move(b));
    }
    if (options.load_mtp) {
      for (int i = 0; i < c_.num_nextn_predict_layers; ++i) {
        const int block = c_.num_hidden_layers + i;
        const std::string p = BlockPrefix(c_, block);
        MtpWeights m;
        EM_ASSIGN_OR_RETURN(m.block, Block(block, options));
        EM_ASSIGN_OR_RETURN(m.e_proj, ckpt_.GetMatrix(p + "e_proj.weight", D, D));
        EM_ASSIGN_OR_RETURN(m.h_proj, ckpt_.GetMatrix(p + "h_proj.weight", D, D));
        EM_ASSIGN_OR_RETURN(m.enorm, ckpt_.GetFloats(p + "enorm.weight", {D}));
        EM_ASSIGN_OR_RETURN(m.hnorm, ckpt_.GetFloats(p + "hnorm.weight", {D}));
        EM_ASSIGN_OR_RETURN(m.norm, ckpt_.GetFloats(p + "norm.weight", {D}));
        EM_ASSIGN_OR_RETURN(
            m.hc_head, HcParams(p + "hc_head_fn", p + "hc_head_base", p + "hc_head_scale", Hc, 1));
        w.mtp.push_back(std::move(m));
      }
    }
    return w;
  }

 private:
  const Checkpoint& ckpt_;
  const ModelConfig& c_;
};

}  // namespace

bool SliceRows(const WeightMatrix& w, int64_t r0, int64_t n, WeightMatrix* out) {
  *out = w;
  out->rows = n;
  const uint8_t* data = static_cast<const uint8_t*>(w.data);
  const uint8_t* scales = static_cast<const uint8_t*>(w.scales);
  const size_t scale_size = w.scale_format == kernels::ScaleFormat::kF32 ? 4 : 1;
  switch (w.format) {
    case kernels::WeightFormat::kF32:
      out->data = data + r0 * w.cols * 4;
      return true;
    case kernels::WeightFormat::kBF16:
      out->data = data + r0 * w.cols * 2;
      return true;
    case kernels::WeightFormat::kFP8E4M3: {
      if (r0 % w.block_rows != 0) return false;
      const int64_t scale_cols = (w.cols + w.block_cols - 1) / w.block_cols;
      out->data = data + r0 * w.cols;
      out->scales = scales + (r0 / w.block_rows) * scale_cols * scale_size;
      return true;
    }
    case kernels::WeightFormat::kFP4E2M1:
      out->data = data + r0 * w.cols / 2;
      out->scales = scales + r0 * (w.cols / 32) * scale_size;
      return true;
  }
  return false;
}

namespace {

uint64_t VecBytes(const std::vector<float>& v) { return v.size() * sizeof(float); }

uint64_t ExpertBytes(const std::optional<ExpertWeights>& e) {
  if (!e) return 0;
  return kernels::MatrixBytes(e->w1) + kernels::MatrixBytes(e->w3) + kernels::MatrixBytes(e->w2);
}

uint64_t CompressorBytes(const CompressorWeights& c) {
  return VecBytes(c.ape) + kernels::MatrixBytes(c.wkv) + kernels::MatrixBytes(c.wgate) +
         VecBytes(c.norm);
}

uint64_t HcBytes(const HcWeights& h) {
  return kernels::MatrixBytes(h.fn) + VecBytes(h.base) + VecBytes(h.scale);
}

uint64_t BlockBytes(const BlockWeights& b) {
  const AttentionWeights& a = b.attn;
  uint64_t n = VecBytes(b.attn_norm) + VecBytes(b.ffn_norm) + HcBytes(b.hc_attn) +
               HcBytes(b.hc_ffn) + VecBytes(a.attn_sink) + kernels::MatrixBytes(a.wq_a) +
               VecBytes(a.q_norm) + kernels::MatrixBytes(a.wq_b) + kernels::MatrixBytes(a.wkv) +
               VecBytes(a.kv_norm) + kernels::MatrixBytes(a.wo_a) + kernels::MatrixBytes(a.wo_b);
  if (a.compressor) n += CompressorBytes(*a.compressor);
  if (a.indexer) {
    n += kernels::MatrixBytes(a.indexer->wq_b) + kernels::MatrixBytes(a.indexer->weights_proj) +
         CompressorBytes(a.indexer->compressor);
  }
  n += kernels::MatrixBytes(b.moe.gate) + VecBytes(b.moe.bias) +
       b.moe.tid2eid.size() * sizeof(int32_t) + ExpertBytes(b.moe.shared);
  for (const auto& e : b.moe.experts) n += ExpertBytes(e);
  return n;
}

}  // namespace

uint64_t ResidentWeightBytes(const ModelWeights& w) {
  uint64_t n = kernels::MatrixBytes(w.embed) + kernels::MatrixBytes(w.head) + VecBytes(w.norm) +
               HcBytes(w.hc_head);
  for (const BlockWeights& b : w.layers) n += BlockBytes(b);
  for (const MtpWeights& m : w.mtp) {
    n += BlockBytes(m.block) + kernels::MatrixBytes(m.e_proj) + kernels::MatrixBytes(m.h_proj) +
         VecBytes(m.enorm) + VecBytes(m.hnorm) + VecBytes(m.norm) + HcBytes(m.hc_head);
  }
  return n;
}

absl::StatusOr<ModelWeights> LoadModelWeights(const Checkpoint& ckpt, const LoadOptions& options) {
  return Loader(ckpt).Model(options);
}

absl::StatusOr<ExpertWeights> LoadExpertWeights(const Checkpoint& ckpt, int block, int expert) {
  const ModelConfig& c = ckpt.config();
  if (block < 0 || block >= c.NumBlocks() || expert < 0 || expert >= c.n_routed_experts) {
    return absl::InvalidArgumentError("LoadExpertWeights: block " + std::to_string(block) +
                                      " expert " + std::to_string(expert) + " out of range");
  }
  return Loader(ckpt).Expert(BlockPrefix(c, block) + "ffn.experts." + std::to_string(expert) + ".",
                             c.moe_intermediate_size);
}

}  // namespace expertmesh::model
