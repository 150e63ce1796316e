#include "tests/testing/cluster_requests.h"

#include <chrono>

#include "core/rpc/status.h"
#include "grpcpp/grpcpp.h"

namespace expertmesh::testing {
namespace {

// One unary call on a fresh stub; `call` issues it, `what` names it in the error.
template <typename Response, typename Call>
absl::StatusOr<Response> AskRouter(const std::string& router, const char* what, Call call) {
  auto stub = expertmesh::v1::Router::NewStub(
      grpc::CreateChannel(router, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  Response response;
  grpc::Status st = call(*stub, &ctx, &response);
  if (!st.ok()) return absl::UnavailableError(std::string(what) + ": " + st.error_message());
  return response;
}

}  // namespace

absl::StatusOr<expertmesh::v1::ListMembersResponse> ListMembers(const std::string& router) {
  return AskRouter<expertmesh::v1::ListMembersResponse>(
      router, "ListMembers",
      [](expertmesh::v1::Router::Stub& stub, grpc::ClientContext* ctx,
         expertmesh::v1::ListMembersResponse* out) { return stub.ListMembers(ctx, {}, out); });
}

absl::StatusOr<expertmesh::v1::PlacementTable> GetPlacement(const std::string& router) {
  return AskRouter<expertmesh::v1::PlacementTable>(
      router, "GetPlacement",
      [](expertmesh::v1::Router::Stub& stub, grpc::ClientContext* ctx,
         expertmesh::v1::PlacementTable* out) { return stub.GetPlacement(ctx, {}, out); });
}

std::vector<GenRequest> MakeGenRequests(int count, int vocab, int min_new, uint64_t salt) {
  GenRequestSpec spec;
  spec.vocab = vocab;
  spec.min_new = min_new;
  spec.max_new = min_new + 11;
  spec.salt = salt;
  return MakeGenRequests(count, spec);
}

std::vector<GenRequest> MakeGenRequests(int count, const GenRequestSpec& spec) {
  std::vector<GenRequest> reqs;
  uint64_t x = spec.salt | 1;
  auto next = [&] {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
  };
  for (int i = 0; i < count; ++i) {
    GenRequest r;
    const int len =
        spec.min_prompt + static_cast<int>(next() % (spec.max_prompt - spec.min_prompt + 1));
    for (int j = 0; j < len; ++j) r.prompt.push_back(static_cast<int32_t>(next() % spec.vocab));
    if (i % 2 == 1) {
      r.sampling.temperature = 0.8;
      r.sampling.top_p = 0.95;
      r.sampling.top_k = i % 4 == 1 ? 50 : 0;
      r.sampling.seed = spec.salt + 1000 + static_cast<uint64_t>(i);
    }
    r.max_new = spec.min_new + static_cast<int>(next() % (spec.max_new - spec.min_new + 1));
    reqs.push_back(r);
  }
  return reqs;
}

GenResult RunGenerate(expertmesh::v1::AttentionWorker::Stub& stub, const std::string& id,
                      const GenRequest& r, absl::Duration deadline) {
  expertmesh::v1::SequenceRequest req;
  req.set_sequence_id(id);
  for (int32_t t : r.prompt) req.add_prompt_ids(static_cast<uint32_t>(t));
  auto* sp = req.mutable_sampling();
  sp->set_temperature(static_cast<float>(r.sampling.temperature));
  sp->set_top_p(static_cast<float>(r.sampling.top_p));
  sp->set_top_k(static_cast<uint32_t>(r.sampling.top_k));
  sp->set_seed(r.sampling.seed);
  sp->set_max_new_tokens(static_cast<uint32_t>(r.max_new));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  GenResult out;
  auto reader = stub.Generate(&ctx, req);
  expertmesh::v1::SequenceTokens msg;
  while (reader->Read(&msg)) {
    if (msg.seed() != 0) out.seed = msg.seed();
    for (uint32_t t : msg.token_ids()) out.tokens.push_back(static_cast<int32_t>(t));
  }
  out.status = rpc::FromGrpcStatus(reader->Finish());
  return out;
}

absl::StatusOr<std::vector<int32_t>> EngineTokens(model::Model& model, const GenRequest& r) {
  auto g = engine::Generate(model, r.prompt, r.max_new, r.sampling);
  if (!g.ok()) return g.status();
  return g->ids;
}

}  // namespace expertmesh::testing
