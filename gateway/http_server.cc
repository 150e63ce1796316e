#include "gateway/http_server.h"

// clang-format off
// g++ 12 needs <utility> before Asio (STACK.md).
#include <utility>
// clang-format on

#include <boost/asio.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <vector>

namespace expertmesh::gateway {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {
// Requests larger than this are refused with 413 (chat requests are kilobytes).
constexpr uint64_t kBodyLimit = 8 << 20;
// A connection idle this long is closed; also the limit on one write to a stalled client.
constexpr auto kIdleTimeout = std::chrono::seconds(60);
constexpr size_t kMaxQueuedBytes = ResponseWriter::kMaxQueuedBytes;

using Strand = asio::strand<asio::io_context::executor_type>;
using Executor = asio::any_io_executor;

// The state of one deferred answer, shared by the connection's coroutine (on its strand) and the
// producer thread (through Writer). The coroutine sleeps on `timer` while nothing is queued;
// the producer wakes it by posting a cancel to the strand.
struct Pending : std::enable_shared_from_this<Pending> {
  enum class Kind { kNone, kWhole, kStream };
  explicit Pending(Executor s) : strand(std::move(s)) {}

  // With mu held: the session no longer waits. The strand copy goes too: a producer thread may
  // drop its Writer after the server and its io_context are gone, and a strand must not be
  // destroyed after its io_context.
  void Detach() {
    detached = true;
    timer = nullptr;
    strand.reset();
  }
  // With mu held: the producer's OnDrained callback, if it is due (the queue is below the limit
  // or nobody reads any more). The caller runs it after unlocking.
  std::function<void()> TakeDrained() {
    if (!on_drained || (queued_bytes >= kMaxQueuedBytes && !gone && !detached)) return nullptr;
    return std::exchange(on_drained, nullptr);
  }

  // With mu held.
  void Wake() {
    if (detached || wake_posted) return;
    wake_posted = true;
    asio::post(*strand, [self = shared_from_this()] {
      std::lock_guard<std::mutex> lock(self->mu);
      self->wake_posted = false;
      if (!self->detached && self->timer != nullptr) self->timer->cancel();
    });
  }
  // The client hung up (or the server stops): runs the callback once.
  void Gone() {
    std::function<void()> callback;
    std::function<void()> drained;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (gone) return;
      gone = true;
      callback = std::move(on_gone);
      drained = TakeDrained();
      Wake();
    }
    if (callback) callback();
    if (drained) drained();
  }

  std::optional<Executor> strand;  // the connection's, until Detach
  std::mutex mu;
  asio::steady_timer* timer = nullptr;  // the session's; valid while !detached
  Kind kind = Kind::kNone;
  HttpResponse whole;
  int stream_status = 200;
  std::string stream_type;
  std::deque<std::string> chunks;
  size_t queued_bytes = 0;
  bool ended = false;      // End, Respond, or the writer was dropped
  bool abandoned = false;  // dropped without an answer
  bool gone = false;
  bool detached = false;  // the session no longer waits: nothing may touch the strand
  bool wake_posted = false;
  std::function<void()> on_gone;
  std::function<void()> on_drained;  // OnDrained's, while the queue is over the limit
};

class Writer final : public ResponseWriter {
 public:
  explicit Writer(std::shared_ptr<Pending> p) : p_(std::move(p)) {}
  ~Writer() override {
    std::lock_guard<std::mutex> lock(p_->mu);
    if (!p_->ended) {
      p_->ended = true;
      p_->abandoned = true;
      p_->Wake();
    }
  }
  bool Respond(HttpResponse response) override {
    std::lock_guard<std::mutex> lock(p_->mu);
    if (p_->gone || p_->kind != Pending::Kind::kNone) return false;
    p_->kind = Pending::Kind::kWhole;
    p_->whole = std::move(response);
    p_->ended = true;
    p_->Wake();
    return true;
  }
  bool BeginStream(int status, const std::string& content_type) override {
    std::lock_guard<std::mutex> lock(p_->mu);
    if (p_->gone || p_->kind != Pending::Kind::kNone) return false;
    p_->kind = Pending::Kind::kStream;
    p_->stream_status = status;
    p_->stream_type = content_type;
    p_->Wake();
    return true;
  }
  bool Write(std::string data) override {
    std::lock_guard<std::mutex> lock(p_->mu);
    if (p_->gone || p_->kind != Pending::Kind::kStream || p_->ended) return false;
    if (data.empty()) return true;  // an empty chunk would end the chunked body
    p_->queued_bytes += data.size();
    p_->chunks.push_back(std::move(data));
    p_->Wake();
    return true;
  }
  void End() override {
    std::lock_guard<std::mutex> lock(p_->mu);
    if (p_->ended) return;
    p_->ended = true;
    p_->Wake();
  }
  size_t queued_bytes() const override {
    std::lock_guard<std::mutex> lock(p_->mu);
    return p_->queued_bytes;
  }
  bool OnDrained(std::function<void()> callback) override {
    std::lock_guard<std::mutex> lock(p_->mu);
    if (p_->gone || p_->detached || p_->queued_bytes < kMaxQueuedBytes) return false;
    p_->on_drained = std::move(callback);
    return true;
  }
  bool client_gone() const override {
    std::lock_guard<std::mutex> lock(p_->mu);
    return p_->gone;
  }
  void OnClientGone(std::function<void()> callback) override {
    {
      std::lock_guard<std::mutex> lock(p_->mu);
      if (!p_->gone) {
        p_->on_gone = std::move(callback);
        return;
      }
    }
    callback();
  }

 private:
  std::shared_ptr<Pending> p_;
};

}  // namespace

struct HttpServer::Impl {
  asio::io_context ioc{1};
  tcp::acceptor acceptor{ioc};
  Handler handler;
  std::vector<std::thread> threads;
  int port = 0;
  bool stopped = false;
  // Deferred answers in progress, so that Stop can tell their producers to give up.
  std::mutex pending_mu;
  std::set<std::shared_ptr<Pending>> pending;
};

namespace {

// Watches a connection whose answer is pending: readable with nothing to read = the client hung
// up. Bytes (a pipelined request) end the watch and stay in the socket for the next read.
void WatchForHangUp(tcp::socket& socket, std::shared_ptr<Pending> p) {
  socket.async_wait(tcp::socket::wait_read, [&socket, p](beast::error_code ec) {
    {
      std::lock_guard<std::mutex> lock(p->mu);
      // detached: the session ended the watch (and `socket` may be gone).
      if (p->detached || p->timer == nullptr) return;
    }
    if (!ec) {
      char c;
      const size_t n = socket.receive(asio::buffer(&c, 1), tcp::socket::message_peek, ec);
      if (!ec && n > 0) return;
      if (ec == asio::error::would_block || ec == asio::error::try_again) {
        WatchForHangUp(socket, p);
        return;
      }
    }
    p->Gone();
  });
}

http::response<http::string_body> MakeResponse(HttpResponse out, unsigned version,
                                               bool keep_alive) {
  http::response<http::string_body> res{static_cast<http::status>(out.status), version};
  res.set(http::field::server, "expertmesh-gateway");
  res.set(http::field::content_type, out.content_type);
  for (auto& [name, value] : out.headers) res.set(name, value);
  res.keep_alive(keep_alive);
  res.body() = std::move(out.body);
  res.prepare_payload();
  return res;
}

// Serves one deferred answer. Returns whether the connection may serve another request.
asio::awaitable<bool> ServeDeferred(beast::tcp_stream& stream, HttpServer::Impl* impl,
                                    std::function<void(std::shared_ptr<ResponseWriter>)> deferred,
                                    unsigned version, bool keep_alive) {
  auto executor = co_await asio::this_coro::executor;
  auto p = std::make_shared<Pending>(executor);
  asio::steady_timer timer(executor);
  p->timer = &timer;
  {
    std::lock_guard<std::mutex> lock(impl->pending_mu);
    impl->pending.insert(p);
  }
  deferred(std::make_shared<Writer>(p));
  WatchForHangUp(stream.socket(), p);
  bool reusable = false;
  bool headers_sent = false;
  beast::error_code ec;
  while (true) {
    std::unique_lock<std::mutex> lock(p->mu);
    if (p->gone) break;
    if (p->kind == Pending::Kind::kWhole || (p->kind == Pending::Kind::kNone && p->abandoned)) {
      HttpResponse out = std::move(p->whole);
      if (p->kind == Pending::Kind::kNone) {
        out = HttpResponse{};
        out.status = 500;
        out.body =
            "{\"error\":{\"message\":\"the request ended without an answer\",\"type\":"
            "\"server_error\",\"param\":null,\"code\":null}}";
      }
      lock.unlock();
      auto res = MakeResponse(std::move(out), version, keep_alive);
      stream.expires_after(kIdleTimeout);
      co_await http::async_write(stream, res, asio::redirect_error(asio::use_awaitable, ec));
      reusable = !ec && keep_alive;
      break;
    }
    if (p->kind == Pending::Kind::kStream) {
      if (!headers_sent) {
        http::response<http::empty_body> res{static_cast<http::status>(p->stream_status), version};
        res.set(http::field::server, "expertmesh-gateway");
        res.set(http::field::content_type, p->stream_type);
        res.set(http::field::cache_control, "no-cache");
        res.keep_alive(keep_alive);
        res.chunked(true);
        lock.unlock();
        http::response_serializer<http::empty_body> sr{res};
        stream.expires_after(kIdleTimeout);
        co_await http::async_write_header(stream, sr,
                                          asio::redirect_error(asio::use_awaitable, ec));
        headers_sent = true;
        if (ec) break;
        continue;
      }
      if (!p->chunks.empty()) {
        std::string data;
        for (std::string& c : p->chunks) data += c;
        p->chunks.clear();
        p->queued_bytes = 0;
        std::function<void()> drained = p->TakeDrained();
        lock.unlock();
        if (drained) drained();
        stream.expires_after(kIdleTimeout);
        co_await asio::async_write(stream, http::make_chunk(asio::buffer(data)),
                                   asio::redirect_error(asio::use_awaitable, ec));
        if (ec) break;
        continue;
      }
      if (p->ended) {
        lock.unlock();
        stream.expires_after(kIdleTimeout);
        co_await asio::async_write(stream, http::make_chunk_last(),
                                   asio::redirect_error(asio::use_awaitable, ec));
        reusable = !ec && keep_alive;
        break;
      }
    }
    timer.expires_at(asio::steady_timer::time_point::max());
    lock.unlock();
    beast::error_code wait_ec;
    co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, wait_ec));
  }
  {
    std::lock_guard<std::mutex> lock(p->mu);
    p->Detach();
  }
  // Aborts the hang-up watch, which must not outlive this answer.
  beast::error_code cancel_ec;
  stream.socket().cancel(cancel_ec);
  if (ec) p->Gone();  // a failed write: the client is gone
  {
    std::lock_guard<std::mutex> lock(impl->pending_mu);
    impl->pending.erase(p);
  }
  co_return reusable;
}

asio::awaitable<void> Session(tcp::socket socket, HttpServer::Impl* impl) {
  HttpServer::Handler* handler = &impl->handler;
  beast::tcp_stream stream(std::move(socket));
  beast::flat_buffer buffer;
  beast::error_code ec;
  while (true) {
    stream.expires_after(kIdleTimeout);
    http::request_parser<http::string_body> parser;
    parser.body_limit(kBodyLimit);
    co_await http::async_read(stream, buffer, parser,
                              asio::redirect_error(asio::use_awaitable, ec));
    if (ec == http::error::end_of_stream || ec == beast::error::timeout ||
        ec == asio::error::operation_aborted || ec == asio::error::connection_reset ||
        ec == asio::error::eof) {
      break;
    }
    HttpResponse out;
    bool keep_alive = false;
    unsigned version = 11;
    if (ec) {
      // A malformed or oversized request: answer once, then close.
      out.status = ec == http::error::body_limit ? 413 : 400;
      out.body = std::string("{\"error\":{\"message\":\"bad HTTP request: ") + ec.message() +
                 "\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":null}}";
    } else {
      http::request<http::string_body>& req = parser.get();
      version = req.version();
      keep_alive = req.keep_alive();
      HttpRequest in{std::string(req.method_string()), std::string(req.target()),
                     std::move(req.body()), {}};
      for (const auto& field : req) {
        in.headers.emplace_back(std::string(field.name_string()), std::string(field.value()));
      }
      out = (*handler)(in);
    }
    if (out.deferred) {
      const bool reusable =
          co_await ServeDeferred(stream, impl, std::move(out.deferred), version, keep_alive);
      if (!reusable) break;
      continue;
    }
    auto res = MakeResponse(std::move(out), version, keep_alive);
    beast::error_code write_ec;
    co_await http::async_write(stream, res, asio::redirect_error(asio::use_awaitable, write_ec));
    if (write_ec || !keep_alive) break;
  }
  stream.socket().shutdown(tcp::socket::shutdown_send, ec);
}

asio::awaitable<void> Listen(HttpServer::Impl* impl) {
  while (true) {
    beast::error_code ec;
    // Each connection on its own strand: its coroutine, hang-up watch and wake-ups never run
    // at once even with several server threads.
    Strand strand = asio::make_strand(impl->ioc);
    tcp::socket socket =
        co_await impl->acceptor.async_accept(strand, asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
      if (!impl->acceptor.is_open()) co_return;
      continue;  // e.g. EMFILE: keep serving the connections we have
    }
    asio::co_spawn(strand, Session(std::move(socket), impl), asio::detached);
  }
}

}  // namespace

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& host, int port,
                                                              Handler handler, int threads) {
  auto impl = std::make_unique<Impl>();
  impl->handler = std::move(handler);
  beast::error_code ec;
  asio::ip::address address = asio::ip::make_address(host, ec);
  if (ec) return absl::InvalidArgumentError("HTTP host '" + host + "' is not an IP address");
  tcp::endpoint endpoint(address, static_cast<unsigned short>(port));
  impl->acceptor.open(endpoint.protocol(), ec);
  if (!ec) impl->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(endpoint, ec);
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError("HTTP server cannot listen on " + host + ":" +
                                  std::to_string(port) + ": " + ec.message());
  }
  impl->port = impl->acceptor.local_endpoint().port();
  asio::co_spawn(impl->ioc, Listen(impl.get()), asio::detached);
  for (int i = 0; i < std::max(1, threads); ++i) {
    Impl* raw = impl.get();
    impl->threads.emplace_back([raw] { raw->ioc.run(); });
  }
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

HttpServer::~HttpServer() { Stop(); }

int HttpServer::port() const { return impl_->port; }

void HttpServer::StopAccepting() {
  asio::post(impl_->ioc, [impl = impl_.get()] {
    beast::error_code ec;
    impl->acceptor.close(ec);
  });
}

void HttpServer::Stop() {
  if (impl_->stopped) return;
  impl_->stopped = true;
  // Producers of pending answers give up (their client is as good as gone) and never touch the
  // io_context again.
  std::vector<std::shared_ptr<Pending>> pending;
  {
    std::lock_guard<std::mutex> lock(impl_->pending_mu);
    pending.assign(impl_->pending.begin(), impl_->pending.end());
  }
  for (auto& p : pending) {
    {
      std::lock_guard<std::mutex> lock(p->mu);
      p->Detach();
    }
    p->Gone();
  }
  asio::post(impl_->ioc, [impl = impl_.get()] {
    beast::error_code ec;
    impl->acceptor.close(ec);
  });
  // Open connections are not waited for: stop() abandons their coroutines, which are destroyed
  // with the io_context.
  impl_->ioc.stop();
  for (std::thread& t : impl_->threads) t.join();
}

}  // namespace expertmesh::gateway
