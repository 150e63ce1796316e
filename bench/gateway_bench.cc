// Gateway benchmark (issue 9; not a test): one HTTP thread holds N concurrent SSE streams
// (default 1000) of POST /v1/chat/completions against the scripted attention worker, and we
// report the gateway's CPU time per streamed token and its memory per stream.
//
// Layout: the scripted worker runs in a forked child process, so that its CPU is not ours; this
// process runs the gateway (HttpServer with one thread, HttpApi, Generator, the gRPC client) and
// one client thread driving every stream over non-blocking sockets with epoll. Gateway CPU =
// this process's CPU (getrusage RUSAGE_SELF) minus the client thread's (RUSAGE_THREAD), over
// the time the streams run. Memory per stream = the growth of this process's RSS from before
// the streams to the moment all N are open and streaming, divided by N (client buffers are
// small and counted in: an upper bound).
//
//   build/bench/gateway_bench [--streams 1000] [--tokens 100] [--interval-ms 50]
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "core/chat/encoder.h"
#include "core/tokenizer/tokenizer.h"
#include "gateway/gateway_metrics.h"
#include "gateway/generation.h"
#include "gateway/http_api.h"
#include "gateway/http_server.h"
#include "tests/testing/scripted_attention_worker.h"

namespace em = expertmesh;

namespace {

double CpuSeconds(int who) {
  rusage u{};
  getrusage(who, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

long RssKb() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atol(line.c_str() + 6);
  }
  return 0;
}

int Arg(int argc, char** argv, const char* name, int def) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], name) == 0) return std::atoi(argv[i + 1]);
  }
  return def;
}

// The child: serves the scripted worker until killed; writes its port to `fd`.
[[noreturn]] void RunWorker(int fd, std::vector<uint32_t> ids, int interval_ms) {
  em::testing::ScriptedWorkerOptions o;
  o.script = [ids](const em::v1::SequenceRequest&) {
    em::testing::ScriptedReply r;
    r.token_ids = ids;
    return r;
  };
  o.inter_token_interval = absl::Milliseconds(interval_ms);
  o.max_recorded_requests = 8;
  auto w = em::testing::ScriptedAttentionWorker::Start(std::move(o));
  const int port = w.ok() ? (*w)->port() : -1;
  if (write(fd, &port, sizeof(port)) != sizeof(port)) _exit(1);
  if (!w.ok()) _exit(1);
  while (true) pause();
}

struct Stream {
  int fd = -1;
  std::string tail;  // the last bytes seen, to spot the end marker across reads
  size_t bytes = 0;
  bool done = false;
};

}  // namespace

int main(int argc, char** argv) {
  const int streams = Arg(argc, argv, "--streams", 1000);
  const int tokens = Arg(argc, argv, "--tokens", 100);
  const int interval_ms = Arg(argc, argv, "--interval-ms", 50);
  rlimit nofile{};
  getrlimit(RLIMIT_NOFILE, &nofile);
  nofile.rlim_cur = nofile.rlim_max;
  setrlimit(RLIMIT_NOFILE, &nofile);
  signal(SIGPIPE, SIG_IGN);

  auto tok = em::tokenizer::LoadDefaultTokenizer();
  if (!tok.ok()) return em::bench::Fail("gateway_bench", tok.status());
  // Each token one short word; the answer ends on the end-of-sentence id as a model's would.
  std::vector<uint32_t> ids;
  const std::vector<int32_t> word = (*tok)->Encode(" word", false);
  while (static_cast<int>(ids.size()) < tokens) ids.push_back(static_cast<uint32_t>(word[0]));
  ids.push_back(static_cast<uint32_t>(*(*tok)->TokenToId(em::chat::kEos)));

  // Fork before anything here starts gRPC threads.
  int pipefd[2];
  if (pipe(pipefd) != 0) return 1;
  const pid_t child = fork();
  if (child == 0) RunWorker(pipefd[1], ids, interval_ms);
  int worker_port = -1;
  if (read(pipefd[0], &worker_port, sizeof(worker_port)) != sizeof(worker_port) ||
      worker_port <= 0) {
    std::fprintf(stderr, "gateway_bench: the scripted worker did not start\n");
    return 1;
  }

  prometheus::Registry registry;
  em::gateway::GatewayMetrics metrics(registry);
  em::gateway::ModelInfo model;
  model.id = "m";
  model.context_length = 65536;
  em::gateway::GenerationOptions gen;
  gen.attention_worker = "127.0.0.1:" + std::to_string(worker_port);
  gen.metrics = &metrics;
  auto core = std::make_shared<em::gateway::Generator>(model, tok->get(), gen);
  auto api = std::make_unique<em::gateway::HttpApi>(
      model, [] { return em::gateway::RouterHealth{}; }, registry, core);
  auto server = em::gateway::HttpServer::Start(
      "127.0.0.1", 0, [&](const em::gateway::HttpRequest& r) { return api->Handle(r); }, 1);
  if (!server.ok()) return em::bench::Fail("gateway_bench", server.status());
  const int port = (*server)->port();

  const std::string body =
      R"({"model":"m","stream":true,"messages":[{"role":"user","content":"Say words."}]})";
  const std::string request = "POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nContent-Type: "
                              "application/json\r\nContent-Length: " +
                              std::to_string(body.size()) + "\r\n\r\n" + body;

  const long rss_before = RssKb();
  double client_cpu = 0;
  double gateway_cpu_start = 0;
  long rss_open = 0;
  size_t total_bytes = 0;
  int finished = 0;
  double open_seconds = 0;
  const auto t0 = em::bench::Clock::now();
  em::bench::Clock::time_point t_end;
  std::thread client([&] {
    const double self0 = CpuSeconds(RUSAGE_SELF);
    const double mine0 = CpuSeconds(RUSAGE_THREAD);
    gateway_cpu_start = self0;
    const int ep = epoll_create1(0);
    std::vector<Stream> s(streams);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int i = 0; i < streams; ++i) {
      s[i].fd = socket(AF_INET, SOCK_STREAM, 0);
      if (connect(s[i].fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
          send(s[i].fd, request.data(), request.size(), 0) != static_cast<ssize_t>(request.size())) {
        std::fprintf(stderr, "gateway_bench: stream %d could not start: %s\n", i,
                     std::strerror(errno));
        std::exit(1);
      }
      fcntl(s[i].fd, F_SETFL, O_NONBLOCK);
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u32 = static_cast<uint32_t>(i);
      epoll_ctl(ep, EPOLL_CTL_ADD, s[i].fd, &ev);
    }
    open_seconds = em::bench::Seconds(t0, em::bench::Clock::now());
    bool rss_taken = false;
    std::vector<epoll_event> events(256);
    char buf[16384];
    while (finished < streams) {
      const int n = epoll_wait(ep, events.data(), static_cast<int>(events.size()), 1000);
      for (int k = 0; k < n; ++k) {
        Stream& st = s[events[k].data.u32];
        while (true) {
          const ssize_t got = recv(st.fd, buf, sizeof(buf), 0);
          if (got <= 0) {
            if (got == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
              if (!st.done) {
                std::fprintf(stderr, "gateway_bench: a stream was cut\n");
                std::exit(1);
              }
            }
            break;
          }
          st.bytes += static_cast<size_t>(got);
          st.tail.append(buf, static_cast<size_t>(got));
          if (st.tail.size() > 64) st.tail.erase(0, st.tail.size() - 64);
          // The chunked body's terminating chunk follows `data: [DONE]`.
          if (!st.done && st.tail.find("[DONE]") != std::string::npos &&
              st.tail.find("0\r\n\r\n") != std::string::npos) {
            st.done = true;
            ++finished;
            total_bytes += st.bytes;
            epoll_ctl(ep, EPOLL_CTL_DEL, st.fd, nullptr);
            close(st.fd);
            break;
          }
        }
      }
      // All streams open and past their first tokens: the memory they hold.
      if (!rss_taken && em::bench::Seconds(t0, em::bench::Clock::now()) >
                            open_seconds + 3.0 * interval_ms / 1000.0) {
        rss_taken = true;
        rss_open = RssKb();
      }
    }
    t_end = em::bench::Clock::now();
    client_cpu = CpuSeconds(RUSAGE_THREAD) - mine0;
    close(ep);
  });
  client.join();
  const double self_cpu = CpuSeconds(RUSAGE_SELF) - gateway_cpu_start;
  const double gateway_cpu = self_cpu - client_cpu;
  const double wall = em::bench::Seconds(t0, t_end);
  const double streamed_tokens = static_cast<double>(streams) * tokens;

  std::printf("gateway_bench: %d concurrent SSE streams x %d tokens (one every %d ms), one HTTP "
              "thread\n",
              streams, tokens, interval_ms);
  std::printf("  wall %.2f s (streams opened in %.2f s), %.0f tokens/s through the gateway\n",
              wall, open_seconds, streamed_tokens / wall);
  std::printf("  gateway CPU %.3f s (process %.3f s - client thread %.3f s)\n", gateway_cpu,
              self_cpu, client_cpu);
  std::printf("  per streamed token: %.1f us of gateway CPU (goal < 50 us)\n",
              1e6 * gateway_cpu / streamed_tokens);
  std::printf("  SSE bytes received %.1f MB (%.0f B per token)\n", total_bytes / 1e6,
              total_bytes / streamed_tokens);
  std::printf("  RSS before %ld KiB, with all streams open %ld KiB: %.1f KiB per stream\n",
              rss_before, rss_open, static_cast<double>(rss_open - rss_before) / streams);

  (*server)->Stop();
  api.reset();
  core.reset();
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  return 0;
}
