// A small HTTP/1.1 server on Boost.Beast with C++20 coroutines (one coroutine per connection,
// keep-alive, body limit, idle timeout). Requests go to one handler function; Beast stays out of
// this header so that the gateway's API logic compiles without it.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace expertmesh::gateway {

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // path and query, as sent
  std::string body;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
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
  // Closes the listener and all connections and joins the threads. Idempotent.
  void Stop();

  struct Impl;  // Beast/Asio state, opaque here

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace expertmesh::gateway
