// Per-sequence inference state (MODEL.md, State per sequence): for every block (trunk layers,
// then MTP blocks) the sliding-window KV ring, the compressed KV entries, the indexer keys and
// both compressors' pending windows. All values are float32 here; the KV values are exactly
// representable in FP8/FP4 codes (the QAT roundings), which core/state uses to store them
// compactly. Not thread-safe: one forward pass at a time may use a state.
#pragma once

#include <cstdint>
#include <vector>

#include "core/model/config.h"

namespace expertmesh::model {

// Pending inputs of one compressor. Slot s of a window holds token (window_start + s).
struct CompressorState {
  int ratio = 0;
  int row = 0;           // coff * width floats per token
  std::vector<float> a;  // [ratio][row]: the current (incomplete) window's wkv rows
  std::vector<float> g;  // [ratio][row]: its wgate rows (+ ape)
  // Overlap (coff == 2): the previous complete window's rows, which entry m pools with window
  // m. Meaningful once a window completed (position >= ratio); zero before.
  std::vector<float> prev_a, prev_g;
};

struct BlockState {
  int ratio = 0;
  std::vector<float> window;      // [W][d]; position p lives in slot p % W
  std::vector<float> compressed;  // [(t+1) div ratio][d]
  CompressorState compressor;     // ratio > 0
  std::vector<float> index_keys;  // [(t+1) div 4][Id], ratio == 4
  CompressorState index_compressor;
};

struct SequenceState {
  int64_t position = 0;            // trunk tokens consumed (the next token's position)
  int64_t mtp_position = 0;        // tokens consumed by the MTP blocks
  std::vector<BlockState> blocks;  // config.NumBlocks(): trunk layers, then MTP blocks

  // An empty state (position 0) shaped for `config`.
  static SequenceState Create(const ModelConfig& config);
};

}  // namespace expertmesh::model
