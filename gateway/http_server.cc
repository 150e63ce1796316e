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
// A connection idle this long is closed.
constexpr auto kIdleTimeout = std::chrono::seconds(60);
}  // namespace

struct HttpServer::Impl {
  asio::io_context ioc{1};
  tcp::acceptor acceptor{ioc};
  Handler handler;
  std::vector<std::thread> threads;
  int port = 0;
  bool stopped = false;
};

namespace {

asio::awaitable<void> Session(tcp::socket socket, HttpServer::Handler* handler) {
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
                     std::move(req.body())};
      out = (*handler)(in);
    }
    http::response<http::string_body> res{static_cast<http::status>(out.status), version};
    res.set(http::field::server, "expertmesh-gateway");
    res.set(http::field::content_type, out.content_type);
    res.keep_alive(keep_alive);
    res.body() = std::move(out.body);
    res.prepare_payload();
    beast::error_code write_ec;
    co_await http::async_write(stream, res, asio::redirect_error(asio::use_awaitable, write_ec));
    if (write_ec || !keep_alive) break;
  }
  stream.socket().shutdown(tcp::socket::shutdown_send, ec);
}

asio::awaitable<void> Listen(HttpServer::Impl* impl) {
  while (true) {
    beast::error_code ec;
    tcp::socket socket =
        co_await impl->acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
      if (!impl->acceptor.is_open()) co_return;
      continue;  // e.g. EMFILE: keep serving the connections we have
    }
    asio::co_spawn(impl->ioc, Session(std::move(socket), &impl->handler), asio::detached);
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

void HttpServer::Stop() {
  if (impl_->stopped) return;
  impl_->stopped = true;
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
