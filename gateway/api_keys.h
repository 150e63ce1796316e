// API keys, tenants and the per-key concurrency limit of the gateway. Keys come from
// `--api-key KEY[:TENANT]` (fixed for the process's life) and `--api-keys-file FILE` (re-read on
// SIGHUP). With no key configured the gateway is open and the tenant is empty. A key's tenant
// defaults to a fingerprint of the key ("key-" + 12 hex digits), so that keys without a tenant
// never share prefix-cache entries and the key itself never reaches the workers, logs or metrics.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gateway/http_server.h"

namespace expertmesh::gateway {

struct ApiKey {
  std::string key;
  std::string tenant;
};

// The tenant of a key given without one.
std::string KeyFingerprint(std::string_view key);

// `KEY` or `KEY:TENANT` (the first ':' splits). Errors: InvalidArgument (empty key, whitespace).
absl::StatusOr<ApiKey> ParseApiKeyFlag(std::string_view text);
// A keys file's text: one `KEY [TENANT]` per line, `#` starts a comment, blank lines skipped.
// Errors: InvalidArgument naming `source` and the line (more than two fields, a key repeated
// with another tenant).
absl::StatusOr<std::vector<ApiKey>> ParseApiKeysText(std::string_view text,
                                                      std::string_view source);
absl::StatusOr<std::vector<ApiKey>> LoadApiKeysFile(const std::string& path);

// What an admitted request carries on: the key's tenant and, for generation routes, the
// concurrency slot (released when the last copy of `lease` goes).
struct Admission {
  std::string tenant;
  std::shared_ptr<void> lease;
};

class ApiKeys {
 public:
  // `max_concurrent_per_key` 0 = unlimited. Loads `file` (if not empty) at once.
  // Errors: InvalidArgument (a bad flag value or file line), NotFound (the file).
  static absl::StatusOr<std::unique_ptr<ApiKeys>> Create(const std::vector<std::string>& flags,
                                                         std::string file,
                                                         int64_t max_concurrent_per_key);

  // Re-reads the keys file. On an error the keys in use stay and the error is returned (the
  // caller logs it). No-op without a file. Thread-safe.
  absl::Status Reload();

  // No key configured: every request is admitted with an empty tenant.
  bool open() const;
  size_t size() const;

  // Checks the request's key (`Authorization: Bearer KEY` or `x-api-key: KEY`; empty strings
  // for headers not sent) and, if `take_slot`, takes one of the key's concurrency slots. On
  // refusal returns the answer to send: 401 (no or unknown key) or 429 with Retry-After (the
  // key's slots are all in use), in OpenAI's shape or, with `anthropic`, in Anthropic's.
  // Thread-safe.
  std::optional<HttpResponse> Admit(std::string_view authorization, std::string_view x_api_key,
                                    bool take_slot, bool anthropic, Admission* out);

  // Slots in use by `key` (tests).
  int InUse(const std::string& key) const;

 private:
  struct Slots {
    std::mutex mu;
    std::map<std::string, int> in_use;  // by key; entries at 0 are erased
  };

  ApiKeys(std::vector<ApiKey> fixed, std::string file, int64_t limit)
      : fixed_(std::move(fixed)), file_(std::move(file)), limit_(limit) {}
  void Install(const std::vector<ApiKey>& from_file);  // with mu_ held

  const std::vector<ApiKey> fixed_;
  const std::string file_;
  const int64_t limit_;
  mutable std::mutex mu_;
  std::map<std::string, std::string> tenants_;  // key -> tenant
  std::shared_ptr<Slots> slots_ = std::make_shared<Slots>();  // leases may outlive this object
};

}  // namespace expertmesh::gateway
