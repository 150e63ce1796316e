#include "gateway/api_keys.h"

#include <cctype>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "core/base/hash.h"
#include "nlohmann/json.hpp"

namespace expertmesh::gateway {
namespace {

using nlohmann::json;

// Spaces and control characters (a key or tenant holds neither).
bool IsBlank(char c) { return static_cast<unsigned char>(c) <= 0x20 || c == 0x7f; }

bool HasSpace(std::string_view s) {
  for (char c : s) {
    if (IsBlank(c)) return true;
  }
  return false;
}

std::string_view Strip(std::string_view s) {
  while (!s.empty() && IsBlank(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsBlank(s.back())) s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> Fields(std::string_view line) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && IsBlank(line[i])) ++i;
    size_t j = i;
    while (j < line.size() && !IsBlank(line[j])) ++j;
    if (j > i) out.push_back(line.substr(i, j - i));
    i = j;
  }
  return out;
}

bool StartsWithIgnoreCase(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size()) return false;
  for (size_t i = 0; i < prefix.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(s[i])) !=
        std::tolower(static_cast<unsigned char>(prefix[i]))) {
      return false;
    }
  }
  return true;
}

HttpResponse Refusal(int status, bool anthropic, const std::string& message,
                     const std::string& openai_type, const std::string& code,
                     const std::string& anthropic_type) {
  HttpResponse r;
  r.status = status;
  if (anthropic) {
    r.body = json{{"type", "error"}, {"error", {{"type", anthropic_type}, {"message", message}}}}
                 .dump();
  } else {
    r.body = json{{"error",
                   {{"message", message}, {"type", openai_type}, {"param", nullptr},
                    {"code", code}}}}
                 .dump();
  }
  return r;
}

}  // namespace

std::string KeyFingerprint(std::string_view key) {
  // Not a secret-keeping hash: it only has to keep distinct keys apart and show nothing a reader
  // could type back in. 48 bits are plenty for the handful of keys one gateway holds.
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx",
                static_cast<unsigned long long>(base::Mix64(base::Fnv1a64(key))));
  return "key-" + std::string(hex, 12);
}

absl::StatusOr<ApiKey> ParseApiKeyFlag(std::string_view text) {
  ApiKey k;
  const size_t colon = text.find(':');
  k.key = std::string(text.substr(0, colon));
  if (colon != std::string_view::npos) k.tenant = std::string(text.substr(colon + 1));
  if (k.key.empty()) return absl::InvalidArgumentError("--api-key: the key is empty");
  if (HasSpace(k.key) || HasSpace(k.tenant)) {
    return absl::InvalidArgumentError("--api-key: whitespace in the key or tenant");
  }
  if (colon != std::string_view::npos && k.tenant.empty()) {
    return absl::InvalidArgumentError("--api-key: empty tenant after ':'");
  }
  if (k.tenant.empty()) k.tenant = KeyFingerprint(k.key);
  return k;
}

absl::StatusOr<std::vector<ApiKey>> ParseApiKeysText(std::string_view text,
                                                      std::string_view source) {
  std::vector<ApiKey> out;
  std::map<std::string, std::string> seen;
  int line_no = 0;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(start, end - start);
    start = end + 1;
    ++line_no;
    if (size_t hash = line.find('#'); hash != std::string_view::npos) line = line.substr(0, hash);
    std::vector<std::string_view> fields = Fields(line);
    if (fields.empty()) continue;
    const std::string where = std::string(source) + ":" + std::to_string(line_no) + ": ";
    if (fields.size() > 2) {
      return absl::InvalidArgumentError(where + "expected `KEY [TENANT]`, found " +
                                        std::to_string(fields.size()) + " fields");
    }
    ApiKey k{std::string(fields[0]),
             fields.size() == 2 ? std::string(fields[1]) : KeyFingerprint(fields[0])};
    if (HasSpace(k.key) || HasSpace(k.tenant)) {
      return absl::InvalidArgumentError(where + "control characters in the key or tenant");
    }
    auto [it, fresh] = seen.emplace(k.key, k.tenant);
    if (!fresh && it->second != k.tenant) {
      // The line is named, not the key: the error goes to logs.
      return absl::InvalidArgumentError(where + "a key listed before with another tenant");
    }
    if (fresh) out.push_back(std::move(k));
  }
  return out;
}

absl::StatusOr<std::vector<ApiKey>> LoadApiKeysFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError("--api-keys-file: cannot read " + path);
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError("--api-keys-file: error reading " + path);
  return ParseApiKeysText(text.str(), path);
}

absl::StatusOr<std::unique_ptr<ApiKeys>> ApiKeys::Create(const std::vector<std::string>& flags,
                                                         std::string file,
                                                         int64_t max_concurrent_per_key) {
  if (max_concurrent_per_key < 0) {
    return absl::InvalidArgumentError("--max-concurrent-per-key must be >= 0");
  }
  std::vector<ApiKey> fixed;
  for (const std::string& f : flags) {
    absl::StatusOr<ApiKey> k = ParseApiKeyFlag(f);
    if (!k.ok()) return k.status();
    fixed.push_back(std::move(*k));
  }
  std::unique_ptr<ApiKeys> keys(new ApiKeys(std::move(fixed), std::move(file),
                                            max_concurrent_per_key));
  std::vector<ApiKey> from_file;
  if (!keys->file_.empty()) {
    absl::StatusOr<std::vector<ApiKey>> loaded = LoadApiKeysFile(keys->file_);
    if (!loaded.ok()) return loaded.status();
    from_file = std::move(*loaded);
  }
  std::lock_guard<std::mutex> lock(keys->mu_);
  keys->Install(from_file);
  return keys;
}

void ApiKeys::Install(const std::vector<ApiKey>& from_file) {
  tenants_.clear();
  for (const ApiKey& k : from_file) tenants_[k.key] = k.tenant;
  // A key given on the command line keeps its tenant whatever the file says.
  for (const ApiKey& k : fixed_) tenants_[k.key] = k.tenant;
}

absl::Status ApiKeys::Reload() {
  if (file_.empty()) return absl::OkStatus();
  absl::StatusOr<std::vector<ApiKey>> loaded = LoadApiKeysFile(file_);
  if (!loaded.ok()) return loaded.status();
  std::lock_guard<std::mutex> lock(mu_);
  Install(*loaded);
  return absl::OkStatus();
}

bool ApiKeys::open() const {
  std::lock_guard<std::mutex> lock(mu_);
  // A keys file that is present but empty still closes the gateway: the operator asked for keys.
  return tenants_.empty() && file_.empty();
}

size_t ApiKeys::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tenants_.size();
}

int ApiKeys::InUse(const std::string& key) const {
  std::lock_guard<std::mutex> lock(slots_->mu);
  auto it = slots_->in_use.find(key);
  return it == slots_->in_use.end() ? 0 : it->second;
}

std::optional<HttpResponse> ApiKeys::Admit(std::string_view authorization,
                                           std::string_view x_api_key, bool take_slot,
                                           bool anthropic, Admission* out) {
  *out = Admission{};
  if (open()) return std::nullopt;
  std::string_view key = Strip(x_api_key);
  if (key.empty()) {
    std::string_view a = Strip(authorization);
    // The scheme is case-insensitive (RFC 9110).
    if (StartsWithIgnoreCase(a, "bearer ")) key = Strip(a.substr(7));
  }
  if (key.empty()) {
    return Refusal(401, anthropic,
                   "no API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
                   "invalid_request_error", "invalid_api_key", "authentication_error");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = tenants_.find(std::string(key));
    if (it == tenants_.end()) {
      return Refusal(401, anthropic, "invalid API key", "authentication_error",
                     "invalid_api_key", "authentication_error");
    }
    out->tenant = it->second;
  }
  if (!take_slot || limit_ == 0) return std::nullopt;
  const std::string k(key);
  {
    std::lock_guard<std::mutex> lock(slots_->mu);
    int& n = slots_->in_use[k];
    if (n >= limit_) {
      if (n == 0) slots_->in_use.erase(k);
      HttpResponse r = Refusal(
          429, anthropic,
          "this API key already has " + std::to_string(limit_) +
              " requests running (--max-concurrent-per-key); retry when one has finished",
          "rate_limit_error", "rate_limit_exceeded", "rate_limit_error");
      r.headers.emplace_back("Retry-After", "1");
      out->tenant.clear();
      return r;
    }
    ++n;
  }
  std::shared_ptr<Slots> slots = slots_;
  // Non-null, so that a holder testing the lease for presence sees one.
  out->lease = std::shared_ptr<void>(slots.get(), [slots, k](void*) {
    std::lock_guard<std::mutex> lock(slots->mu);
    auto it = slots->in_use.find(k);
    if (it != slots->in_use.end() && --it->second <= 0) slots->in_use.erase(it);
  });
  return std::nullopt;
}

}  // namespace expertmesh::gateway
