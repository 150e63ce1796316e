// A small HTTP/1.1 server on Boost.Beast with C++20 coroutines (one coroutine per connection,
// keep-alive, body limit, idle timeout). Requests go to one handler function; Beast stays out of
// this header so that the gateway's API logic compiles without it.
//
// A handler either answers at once or defers: it returns an HttpResponse whose `deferred` is set
// and later answers through a ResponseWriter from any thread, as one whole response or as a
// chunked stream (SSE) written as the data arrives. While a deferred answer is pending the
// server watches the socket, so that a client that hangs up is noticed before the next write.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh::gateway {

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // path and query, as sent
  std::string body;
  // Header fields as received (names as sent; compare names case-insensitively).
  std::vector<std::pair<std::string, std::string>> headers;
};

class ResponseWriter;

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  // extra headers (e.g. Retry-After)
  // Set: the answer comes later through the writer (status/body above are ignored). Called once
  // on a server thread; must return quickly (hand the work to another thread).
  std::function<void(std::shared_ptr<ResponseWriter>)> deferred;
};

// Answers one deferred request. Thread-safe. Exactly one of Respond or BeginStream..End should
// be called; a writer dropped without either answers 500 (or ends the stream).
class ResponseWriter {
 public:
  // Above this many queued bytes OnDrained holds the producer back (a slow reader).
  static constexpr size_t kMaxQueuedBytes = 256 << 10;

  virtual ~ResponseWriter() = default;
  // The whole response. False if the client is gone (or an answer was already given).
  virtual bool Respond(HttpResponse response) = 0;
  // Sends the status line and headers of a chunked response.
  virtual bool BeginStream(int status, const std::string& content_type) = 0;
  // Queues one chunk; it is written as soon as the connection can take it. Never blocks (it is
  // called on gRPC callback threads): a producer keeps the queue bounded itself by asking
  // OnDrained before producing more. False if the client is gone.
  virtual bool Write(std::string data) = 0;
  // Bytes queued and not yet handed to the socket.
  virtual size_t queued_bytes() const = 0;
  // Backpressure without blocking: if more than kMaxQueuedBytes is queued, keeps `callback` to
  // run once (on a server thread, when the queue has been handed to the socket, or when the
  // client is gone) and returns true: produce nothing more until it runs. Otherwise returns
  // false and never calls it. One callback at a time.
  virtual bool OnDrained(std::function<void()> callback) = 0;
  // Ends the stream (the terminating chunk); the connection may then serve its next request.
  virtual void End() = 0;
  // True once the client disconnected (or the server stopped).
  virtual bool client_gone() const = 0;
  // `callback` runs once, on some thread, when the client disconnects before the answer ended
  // (at once if it already has). Used to cancel the work behind the request.
  virtual void OnClientGone(std::function<void()> callback) = 0;
};

class HttpServer {
 public:
  // Called on a server thread for each request; must not block for long. Thread-safe if
  // `threads` > 1.
  using Handler = std::function<HttpResponse(const HttpRequest&)>;

  // Binds `host`:`port` (port 0 picks a free port) and serves on `threads` threads.
  // Errors: InvalidArgument (bad host), Unavailable (cannot bind).
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& host, int port,
                                                           Handler handler, int threads = 1);
  ~HttpServer();  // Stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const;
  // Closes the listener (new connections are refused) but keeps serving the open ones: the
  // first step of a graceful drain. Idempotent; thread-safe.
  void StopAccepting();
  // Closes the listener and all connections and joins the threads. Idempotent.
  void Stop();

  struct Impl;  // Beast/Asio state, opaque here

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace expertmesh::gateway
