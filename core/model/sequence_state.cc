#include "core/model/sequence_state.h"

namespace expertmesh::model {
namespace {

CompressorState MakeCompressor(int ratio, int width) {
  CompressorState c;
  c.ratio = ratio;
  c.row = (ratio == 4 ? 2 : 1) * width;
  const size_t n = static_cast<size_t>(ratio) * c.row;
  c.a.assign(n, 0.0f);
  c.g.assign(n, 0.0f);
  if (ratio == 4) {
    c.prev_a.assign(n, 0.0f);
    c.prev_g.assign(n, 0.0f);
  }
  return c;
}

}  // namespace

SequenceState SequenceState::Create(const ModelConfig& config) {
  SequenceState s;
  s.blocks.resize(config.NumBlocks());
  for (int b = 0; b < config.NumBlocks(); ++b) {
    BlockState& bs = s.blocks[b];
    bs.ratio = config.CompressRatio(b);
    bs.window.assign(static_cast<size_t>(config.sliding_window) * config.head_dim, 0.0f);
    if (bs.ratio > 0) bs.compressor = MakeCompressor(bs.ratio, config.head_dim);
    if (bs.ratio == 4) bs.index_compressor = MakeCompressor(bs.ratio, config.index_head_dim);
  }
  return s;
}

}  // namespace expertmesh::model
