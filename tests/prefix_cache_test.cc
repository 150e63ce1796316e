// Prefix reuse end to end (issue 10): a local cluster (router, kv-store, attention worker, expert
// worker, gateway with two tenants' keys) on the tiny model. A request sharing a >= 256-token
// prefix with an earlier one of the same tenant loads it from the kv-store: its usage and the
// worker's metrics show the hit, prefill computes only the rest, and its output equals the same
// request without hits (another tenant, which must get none). A SIGKILLed kv-store costs no
// request, and once restarted its disk blocks are hits again.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cli/local_cluster.h"
#include "core/rpc/channel.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"
#include "tests/testing/cluster_fixture.h"
#include "tests/testing/prom_text.h"
#include "tests/testing/tiny_cluster.h"

namespace expertmesh {
namespace {

using nlohmann::json;

constexpr absl::Duration kEventTimeout = absl::Seconds(60);

struct Reply {
  int status = 0;
  std::string body;
};

// One HTTP/1.1 request with extra headers, read to EOF (Connection: close), de-chunked.
Reply Http(int port, const std::string& method, const std::string& target,
           const std::vector<std::string>& headers, const std::string& body) {
  Reply r;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  timeval tv{120, 0};  // a hung gateway fails the test instead of hanging it
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return r;
  }
  std::string req = method + " " + target +
                    " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                    "Content-Type: application/json\r\nContent-Length: " +
                    std::to_string(body.size()) + "\r\n";
  for (const std::string& h : headers) req += h + "\r\n";
  req += "\r\n" + body;
  for (size_t done = 0; done < req.size();) {
    ssize_t n = send(fd, req.data() + done, req.size() - done, MSG_NOSIGNAL);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  std::string raw;
  char buf[16384];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) raw.append(buf, static_cast<size_t>(n));
  close(fd);
  const size_t head_end = raw.find("\r\n\r\n");
  if (head_end == std::string::npos || raw.size() < 12) return r;
  r.status = std::atoi(raw.substr(9, 3).c_str());
  std::string head = raw.substr(0, head_end);
  for (char& c : head) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  std::string rest = raw.substr(head_end + 4);
  if (head.find("transfer-encoding: chunked") == std::string::npos) {
    r.body = std::move(rest);
    return r;
  }
  size_t pos = 0;
  while (pos < rest.size()) {
    const size_t eol = rest.find("\r\n", pos);
    if (eol == std::string::npos) break;
    const size_t len = std::strtoul(rest.substr(pos, eol - pos).c_str(), nullptr, 16);
    if (len == 0) break;
    r.body += rest.substr(eol + 2, len);
    pos = eol + 2 + len + 2;
  }
  return r;
}

// A long shared text: ~40 distinct sentences, well over 256 tokens.
std::string SharedPrefix() {
  std::string s = "Context document. ";
  for (int i = 0; i < 40; ++i) {
    absl::StrAppend(&s, "Item ", i, " of the list says that river ", i * 7 % 13, " flows past hill ",
                    i * 11 % 17, " before the weir. ");
  }
  return s;
}

class PrefixCacheTest : public testing::LocalClusterTest {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("em-prefix-cache");
    absl::StatusOr<std::string> model = testing::MakeTinyModel(dir_);
    ASSERT_TRUE(model.ok()) << model.status();
    cli::LocalClusterOptions o = testing::TinyGatewayClusterOptions(*model);
    o.run_dir = dir_ + "/run";
    o.log_dir = dir_ + "/log";
    // The SIGKILLed kv-store comes back with its disk tier.
    o.restart_on_failure = true;
    o.restart_backoff = absl::Milliseconds(200);
    o.extra_gateway_args = {"--api-key=sk-a:tenant-a", "--api-key=sk-b:tenant-b"};
    StartCluster(o);
  }

  int HttpPort() const { return cluster_->Find("gateway")->http_port; }
  const cli::ClusterMember& Worker() const { return *cluster_->Find("attention-worker-0"); }

  json Post(const std::string& key, const std::string& path, const json& body) {
    Reply r = Http(HttpPort(), "POST", path, {"x-api-key: " + key}, body.dump());
    EXPECT_EQ(r.status, 200) << path << ": " << r.body;
    json j = json::parse(r.body, nullptr, /*allow_exceptions=*/false);
    return j.is_discarded() ? json::object() : j;
  }

  // Sum of a worker metric's samples (0 if absent).
  double Metric(const std::string& name, const std::map<std::string, std::string>& labels = {}) {
    auto r = testing::HttpRequest(Worker().metrics_port, "GET", "/metrics");
    if (!r.ok()) return -1;
    auto scrape = testing::ParsePromText(r->body);
    if (!scrape.ok()) return -1;
    double sum = 0;
    for (const auto& s : scrape->Find(name, labels)) sum += s.value;
    return sum;
  }

  // The writer has sent every block handed to it so far (at least `blocks` in all).
  void WaitPutsDone(double blocks) {
    const absl::Time deadline = absl::Now() + kEventTimeout;
    while (absl::Now() < deadline) {
      if (Metric("expertmesh_attention_kv_put_queue_blocks") == 0 &&
          Metric("expertmesh_attention_kv_block_puts_total") >= blocks) {
        return;
      }
      absl::SleepFor(absl::Milliseconds(50));
    }
    ADD_FAILURE() << "the attention worker did not finish its kv-store puts";
  }

  static json Chat(const std::string& user) {
    return {{"model", "tiny"},
            {"max_tokens", 12},
            {"temperature", 0},
            {"logprobs", true},
            {"top_logprobs", 2},
            {"messages", {{{"role", "user"}, {"content", user}}}}};
  }
  static uint32_t Cached(const json& r) {
    return r["usage"]["prompt_tokens_details"]["cached_tokens"].get<uint32_t>();
  }
};

TEST_F(PrefixCacheTest, SharedPrefixIsAHitWithTheSameOutputAndNeverAcrossTenants) {
  const std::string prefix = SharedPrefix();
  json a = Post("sk-a", "/v1/chat/completions", Chat(prefix + "Question A: which hill is first?"));
  ASSERT_TRUE(a.contains("usage")) << a.dump();
  EXPECT_EQ(Cached(a), 0u);
  const uint32_t a_prompt = a["usage"]["prompt_tokens"];
  ASSERT_GE(a_prompt, 300u) << "the shared prefix is too short to hold two blocks";
  WaitPutsDone((a_prompt + a["usage"]["completion_tokens"].get<uint32_t>() - 1) / 128);

  const double hit0 = Metric("expertmesh_attention_prefix_cache_hit_tokens_total");
  const double prefill0 = Metric("expertmesh_attention_prefill_tokens_total");
  const json b_req = Chat(prefix + "Question B: name the river by the weir.");
  json b = Post("sk-a", "/v1/chat/completions", b_req);
  ASSERT_TRUE(b.contains("usage")) << b.dump();
  const uint32_t b_prompt = b["usage"]["prompt_tokens"], b_cached = Cached(b);
  EXPECT_GE(b_cached, 256u);
  EXPECT_EQ(b_cached % 128, 0u);
  EXPECT_LT(b_cached, b_prompt);
  EXPECT_EQ(Metric("expertmesh_attention_prefix_cache_hit_tokens_total") - hit0, b_cached);
  EXPECT_EQ(Metric("expertmesh_attention_prefill_tokens_total") - prefill0, b_prompt - b_cached);

  // The same request under the other tenant: no hit, and the same answer bit for bit (the
  // text and every token's logprobs, which name the token and its bytes).
  WaitPutsDone(0);
  json b_other = Post("sk-b", "/v1/chat/completions", b_req);
  ASSERT_TRUE(b_other.contains("usage")) << b_other.dump();
  EXPECT_EQ(Cached(b_other), 0u);
  EXPECT_EQ(b_other["usage"]["prompt_tokens"], b_prompt);
  EXPECT_EQ(b_other["choices"][0].dump(), b["choices"][0].dump());

  // Anthropic's split: cache_read_input_tokens are the hit, input_tokens the rest.
  json m = Post("sk-a", "/v1/messages",
                {{"model", "tiny"},
                 {"max_tokens", 12},
                 {"temperature", 0},
                 {"messages", b_req["messages"]}});
  ASSERT_TRUE(m.contains("usage")) << m.dump();
  const uint32_t read = m["usage"]["cache_read_input_tokens"], input = m["usage"]["input_tokens"];
  EXPECT_GE(read, 256u);
  json counted = Post("sk-a", "/v1/messages/count_tokens",
                      {{"model", "tiny"}, {"messages", b_req["messages"]}});
  EXPECT_EQ(input + read, counted["input_tokens"].get<uint32_t>());
  EXPECT_EQ(input + read, b_prompt);
  ASSERT_TRUE(m["content"].is_array() && !m["content"].empty()) << m.dump();
  EXPECT_EQ(m["content"][0]["text"], b["choices"][0]["message"]["content"]);
}

// Token ids at the attention worker (the gateway shows text): a prompt with three stored blocks
// continues with exactly the tokens of a run without them.
TEST_F(PrefixCacheTest, LoadedPrefixGivesTheSameTokenIds) {
  auto stub = v1::AttentionWorker::NewStub(
      rpc::MakeChannel(Worker().grpc_address(cluster_->options().host)));
  auto run = [&](const std::string& id, const std::string& tenant) {
    v1::SequenceRequest r;
    r.set_sequence_id(id);
    r.set_tenant(tenant);
    for (int i = 0; i < 3 * 128 + 20; ++i) r.add_prompt_ids(static_cast<uint32_t>((i * 29 + 5) % 1000));
    r.mutable_sampling()->set_max_new_tokens(16);
    r.mutable_sampling()->set_temperature(0.7f);
    r.mutable_sampling()->set_seed(31);
    grpc::ClientContext ctx;
    rpc::SetTimeout(ctx, absl::Seconds(120));
    auto reader = stub->Generate(&ctx, r);
    std::pair<std::vector<uint32_t>, uint32_t> out{{}, 0};
    v1::SequenceTokens m;
    bool first = true;
    while (reader->Read(&m)) {
      if (first) out.second = m.cached_prompt_tokens();
      first = false;
      out.first.insert(out.first.end(), m.token_ids().begin(), m.token_ids().end());
    }
    EXPECT_TRUE(reader->Finish().ok());
    return out;
  };
  auto cold = run("cold", "t");
  EXPECT_EQ(cold.second, 0u);
  ASSERT_EQ(cold.first.size(), 16u);
  WaitPutsDone(3);
  auto warm = run("warm", "t");
  EXPECT_EQ(warm.second, 3u * 128);
  EXPECT_EQ(warm.first, cold.first);
  auto other = run("other", "u");
  EXPECT_EQ(other.second, 0u);
  EXPECT_EQ(other.first, cold.first);
}

// SIGKILL of the kv-store while requests run: none fails, each equals its answer without the
// store; restarted on the same --disk-dir, the blocks written before the kill are hits again.
TEST_F(PrefixCacheTest, KvStoreKilledUnderLoadCostsNoRequestAndItsDiskBlocksHitAgain) {
  const std::string prefix = SharedPrefix();
  // Blocks of tenant a's prefix, on disk before the kill.
  json seed = Post("sk-a", "/v1/chat/completions", Chat(prefix + "Seed question."));
  ASSERT_TRUE(seed.contains("usage"));
  WaitPutsDone((seed["usage"]["prompt_tokens"].get<uint32_t>() - 1) / 128);

  // The load runs as tenant b with its own prompts, so that nothing it writes after the restart
  // can be what tenant a hits.
  std::vector<json> load;
  for (int i = 0; i < 4; ++i) {
    json r = Chat(absl::StrCat("Load ", i, ". ", prefix, "Load question ", i, "?"));
    r["max_tokens"] = 48;
    load.push_back(r);
  }
  std::vector<json> want;
  for (const json& r : load) want.push_back(Post("sk-b", "/v1/chat/completions", r));
  std::vector<json> got(load.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < load.size(); ++i) {
    threads.emplace_back([&, i] {
      Reply r = Http(HttpPort(), "POST", "/v1/chat/completions", {"x-api-key: sk-b"},
                     load[i].dump());
      got[i] = {{"status", r.status}, {"body", r.body}};
    });
  }
  // Kill once the worker is busy with them.
  const absl::Time busy_by = absl::Now() + kEventTimeout;
  while (Metric("expertmesh_attention_running_sequences") < 1 && absl::Now() < busy_by) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_GE(Metric("expertmesh_attention_running_sequences"), 1) << "the load never ran";
  const pid_t kv_pid = cluster_->Find("kv-store")->pid;
  ASSERT_EQ(kill(kv_pid, SIGKILL), 0);
  // Supervise from this thread: restarted children die with the thread that forked them.
  bool restarted = false;
  const absl::Time deadline = absl::Now() + kEventTimeout;
  while (absl::Now() < deadline && !restarted) {
    absl::Status st = cluster_->Supervise();
    ASSERT_TRUE(st.ok()) << st;
    const cli::ClusterMember* kv = cluster_->Find("kv-store");
    restarted = kv->restarts > 0 && kv->state == cli::ClusterMember::State::kRunning;
    absl::SleepFor(absl::Milliseconds(50));
  }
  for (std::thread& t : threads) t.join();
  ASSERT_TRUE(restarted) << "the kv-store was not restarted";
  for (size_t i = 0; i < load.size(); ++i) {
    ASSERT_EQ(got[i]["status"], 200) << got[i]["body"];
    json body = json::parse(got[i]["body"].get<std::string>());
    EXPECT_EQ(body["choices"][0].dump(), want[i]["choices"][0].dump()) << "request " << i;
  }

  // The restarted store serves tenant a's blocks from disk (its memory tier starts empty). The
  // worker's channel may still be reconnecting: a miss there only costs the reuse, so retry.
  uint32_t cached = 0;
  const json again = Chat(prefix + "After the restart.");
  const absl::Time hit_by = absl::Now() + kEventTimeout;
  while (cached < 256 && absl::Now() < hit_by) {
    ASSERT_TRUE(cluster_->Supervise().ok());
    json r = Post("sk-a", "/v1/chat/completions", again);
    ASSERT_TRUE(r.contains("usage")) << r.dump();
    cached = Cached(r);
    if (cached < 256) absl::SleepFor(absl::Milliseconds(200));
  }
  EXPECT_GE(cached, 256u);
}

}  // namespace
}  // namespace expertmesh
