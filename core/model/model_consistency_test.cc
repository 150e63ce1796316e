// Self-consistency of the forward pass on a checkpoint of another shape than tiny-a (other
// ratios, an MTP block with a compressor, a short window, FP8 experts and a softmax gate), so
// nothing depends on tiny-a's sizes: chunked prefills, batches and restored states must agree
// with one whole prefill byte for byte (MODEL.md, Batch invariance), and so within the contract's
// floors too (median 1e-3, p90 0.02, p99 0.25, argmax 98%; a made-up checkpoint has no
// reference and so no noise floor of its own), which says how far off a difference is.
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>

#include "core/base/status_macros.h"
#include "core/model/golden_contract.h"
#include "core/model/model.h"
#include "core/model/model_maker.h"
#include "gtest/gtest.h"

namespace expertmesh::model {
namespace {

using testing::CompareLogits;
using testing::ContractFigures;

// The model is written and loaded once per suite, on the first test's SetUp: a failure in
// SetUpTestSuite would only mark the tests skipped, while a fatal failure in SetUp fails each
// test that needed the model, with the reason.
class OtherShape : public ::testing::Test {
 protected:
  struct Shared {
    std::string dir;
    std::unique_ptr<Model> model;
    std::vector<int32_t> ids;
    ~Shared() {
      std::error_code ec;
      if (!dir.empty()) std::filesystem::remove_all(dir, ec);
    }
  };

  static absl::StatusOr<std::unique_ptr<Shared>> LoadShared() {
    EM_ASSIGN_OR_RETURN(ModelConfig cfg, PresetConfig("tiny-a-shape"));
    cfg.compress_ratios = {8, 4, 0, 32, 4};  // the MTP block (last) has an indexer
    cfg.sliding_window = 12;
    cfg.index_topk = 3;
    cfg.o_lora_rank = 128;  // wo_a groups cut at FP8 block boundaries (SliceRows)
    cfg.num_hash_layers = 2;
    cfg.scoring_func = ScoringFunc::kSoftmax;
    cfg.expert_dtype = ExpertDType::kFP8;
    auto s = std::make_unique<Shared>();
    s->dir = ::testing::TempDir() + "/em_other_shape_" + std::to_string(getpid());
    std::filesystem::remove_all(s->dir);
    EM_RETURN_IF_ERROR(WriteModel(cfg, 7, s->dir));
    EM_ASSIGN_OR_RETURN(s->model, Model::Load(s->dir));
    for (int i = 0; i < kTokens; ++i) s->ids.push_back((i * 7919 + 13) % cfg.vocab_size);
    return s;
  }

  static void TearDownTestSuite() { shared_.reset(); }

  void SetUp() override {
    if (!shared_) shared_ = std::make_unique<absl::StatusOr<std::unique_ptr<Shared>>>(LoadShared());
    ASSERT_TRUE(shared_->ok()) << "writing and loading the other-shape model: "
                               << shared_->status();
    model_ = (**shared_)->model.get();
    ids_ = &(**shared_)->ids;
  }

  // Logits of all positions with the given chunk schedule.
  std::vector<float> Run(int64_t chunk, int64_t offset = 0) {
    SequenceState st = model_->NewState();
    std::vector<float> out;
    ForwardOptions o;
    o.all_logits = true;
    for (int64_t p = offset; p < kTokens;) {
      int64_t n = std::min<int64_t>(chunk, kTokens - p);
      Segment s{&st, absl::MakeConstSpan(ids_->data() + p, n)};
      auto l = model_->Forward({&s, 1}, o);
      EXPECT_TRUE(l.ok()) << l.status();
      if (!l.ok()) return {};
      out.insert(out.end(), l->begin(), l->end());
      p += n;
    }
    return out;
  }

  void Expect(const std::vector<float>& got, const std::vector<float>& want,
              const std::string& what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    const int64_t V = model_->config().vocab_size;
    ContractFigures f = CompareLogits(got.data(), want.data(), got.size() / V, V);
    const bool same_bytes = std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0;
    std::printf("[consistency] %s: %s bytes %s\n", what.c_str(), f.ToString().c_str(),
                same_bytes ? "identical" : "differ");
    EXPECT_TRUE(f.Meets()) << what << ": " << f.ToString();
    // MODEL.md (Batch invariance): against itself the engine is exact, whatever the chunking
    // or the batch.
    EXPECT_TRUE(same_bytes) << what << ": logits differ from the whole prefill's";
  }

  static constexpr int kTokens = 150;
  static std::unique_ptr<absl::StatusOr<std::unique_ptr<Shared>>> shared_;
  Model* model_ = nullptr;
  const std::vector<int32_t>* ids_ = nullptr;
};
std::unique_ptr<absl::StatusOr<std::unique_ptr<OtherShape::Shared>>> OtherShape::shared_;

TEST_F(OtherShape, ChunkedPrefillMatchesWhole) {
  const std::vector<float> whole = Run(kTokens);
  for (int64_t chunk : {1, 5, 33}) Expect(Run(chunk), whole, "chunks of " + std::to_string(chunk));
}

TEST_F(OtherShape, BatchOfSequencesAtDifferentPositions) {
  const std::vector<float> whole = Run(kTokens);
  const int64_t V = model_->config().vocab_size;
  // Three copies of the sequence, started at different steps, decoded one token per step in a
  // shared batch.
  const int64_t starts[3] = {0, 9, 40};
  std::vector<SequenceState> st(3, model_->NewState());
  std::vector<std::vector<float>> out(3);
  for (int64_t step = 0; step < kTokens + 40; ++step) {
    std::vector<Segment> segs;
    std::vector<int> who;
    for (int s = 0; s < 3; ++s) {
      const int64_t p = step - starts[s];
      if (p < 0 || p >= kTokens) continue;
      segs.push_back({&st[s], absl::MakeConstSpan(ids_->data() + p, 1)});
      who.push_back(s);
    }
    if (segs.empty()) continue;
    auto l = model_->Forward(segs, {});
    ASSERT_TRUE(l.ok()) << l.status();
    for (size_t i = 0; i < who.size(); ++i) {
      out[who[i]].insert(out[who[i]].end(), l->begin() + i * V, l->begin() + (i + 1) * V);
    }
  }
  for (int s = 0; s < 3; ++s) Expect(out[s], whole, "batched copy " + std::to_string(s));
}

TEST_F(OtherShape, MtpChunkedMatchesWhole) {
  const int64_t n = kTokens - 1;
  auto mtp = [&](int64_t chunk) {
    SequenceState st = model_->NewState();
    std::vector<float> out;
    for (int64_t p = 0; p < n; p += chunk) {
      const int64_t k = std::min(chunk, n - p);
      std::vector<float> streams;
      ForwardOptions o;
      o.final_streams = &streams;
      Segment s{&st, absl::MakeConstSpan(ids_->data() + p, k)};
      EXPECT_TRUE(model_->Forward({&s, 1}, o).ok());
      Segment m{&st, absl::MakeConstSpan(ids_->data() + p + 1, k)};
      auto l = model_->ForwardMtp(0, {&m, 1}, streams.data(), true);
      EXPECT_TRUE(l.ok()) << l.status();
      if (l.ok()) out.insert(out.end(), l->begin(), l->end());
    }
    return out;
  };
  const std::vector<float> whole = mtp(n);
  Expect(mtp(1), whole, "mtp token by token");
  Expect(mtp(16), whole, "mtp chunks of 16");
}

}  // namespace
}  // namespace expertmesh::model
