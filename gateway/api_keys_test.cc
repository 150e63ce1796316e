#include "gateway/api_keys.h"

#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"

namespace expertmesh::gateway {
namespace {

using nlohmann::json;

TEST(ApiKeyFlag, KeyWithAndWithoutTenant) {
  auto k = ParseApiKeyFlag("sk-one:team-a");
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->key, "sk-one");
  EXPECT_EQ(k->tenant, "team-a");
  k = ParseApiKeyFlag("sk-two");
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->tenant, KeyFingerprint("sk-two"));
  EXPECT_EQ(k->tenant.find("sk-two"), std::string::npos);
  EXPECT_NE(KeyFingerprint("sk-two"), KeyFingerprint("sk-three"));
  EXPECT_FALSE(ParseApiKeyFlag("").ok());
  EXPECT_FALSE(ParseApiKeyFlag(":tenant").ok());
  EXPECT_FALSE(ParseApiKeyFlag("key:").ok());
  EXPECT_FALSE(ParseApiKeyFlag("a key").ok());
}

TEST(ApiKeysText, CommentsBlankLinesAndErrorsNamingTheLine) {
  auto keys = ParseApiKeysText("# keys\n\nk1 t1\n  k2\tt2  # trailing\r\nk3\n", "keys.txt");
  ASSERT_TRUE(keys.ok()) << keys.status();
  ASSERT_EQ(keys->size(), 3u);
  EXPECT_EQ((*keys)[0].key, "k1");
  EXPECT_EQ((*keys)[0].tenant, "t1");
  EXPECT_EQ((*keys)[1].key, "k2");
  EXPECT_EQ((*keys)[1].tenant, "t2");
  EXPECT_EQ((*keys)[2].tenant, KeyFingerprint("k3"));

  auto bad = ParseApiKeysText("k1 t1\n\nk2 t2 extra\n", "keys.txt");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("keys.txt:3:"), std::string::npos) << bad.status();
  bad = ParseApiKeysText("k1 t1\nk1 t2\n", "f");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("f:2:"), std::string::npos) << bad.status();
  EXPECT_EQ(bad.status().message().find("k1"), std::string::npos) << "the key leaked";
}

TEST(ApiKeys, NoKeysIsOpen) {
  auto keys = ApiKeys::Create({}, "", 1);
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_TRUE((*keys)->open());
  Admission a;
  EXPECT_FALSE((*keys)->Admit("", "", true, false, &a).has_value());
  EXPECT_EQ(a.tenant, "");
}

TEST(ApiKeys, UnknownOrMissingKeyIs401InEachShape) {
  auto keys = ApiKeys::Create({"sk-good:t"}, "", 0);
  ASSERT_TRUE(keys.ok()) << keys.status();
  Admission a;
  std::optional<HttpResponse> r = (*keys)->Admit("", "", false, false, &a);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 401);
  EXPECT_EQ(json::parse(r->body)["error"]["code"], "invalid_api_key");
  r = (*keys)->Admit("Bearer sk-bad", "", false, false, &a);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 401);
  json j = json::parse(r->body);
  EXPECT_EQ(j["error"]["type"], "authentication_error");
  EXPECT_EQ(j["error"]["code"], "invalid_api_key");
  EXPECT_EQ(r->body.find("sk-bad"), std::string::npos);
  r = (*keys)->Admit("", "sk-bad", false, true, &a);
  ASSERT_TRUE(r.has_value());
  j = json::parse(r->body);
  EXPECT_EQ(j["type"], "error");
  EXPECT_EQ(j["error"]["type"], "authentication_error");

  EXPECT_FALSE((*keys)->Admit("bearer  sk-good ", "", false, false, &a).has_value());
  EXPECT_EQ(a.tenant, "t");
  EXPECT_FALSE((*keys)->Admit("", "sk-good", false, true, &a).has_value());
  EXPECT_EQ(a.tenant, "t");
  EXPECT_TRUE((*keys)->Admit("Basic sk-good", "", false, false, &a).has_value());
}

TEST(ApiKeys, ConcurrencyLimitHoldsUntilTheLeaseGoes) {
  auto keys = ApiKeys::Create({"a:ta", "b:tb"}, "", 2);
  ASSERT_TRUE(keys.ok()) << keys.status();
  ApiKeys& k = **keys;
  Admission one, two, three, other;
  EXPECT_FALSE(k.Admit("", "a", true, false, &one).has_value());
  EXPECT_FALSE(k.Admit("", "a", true, false, &two).has_value());
  EXPECT_NE(one.lease, nullptr);
  EXPECT_EQ(k.InUse("a"), 2);
  std::optional<HttpResponse> r = k.Admit("", "a", true, true, &three);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 429);
  EXPECT_EQ(json::parse(r->body)["error"]["type"], "rate_limit_error");
  ASSERT_EQ(r->headers.size(), 1u);
  EXPECT_EQ(r->headers[0].first, "Retry-After");
  r = k.Admit("", "a", true, false, &three);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(json::parse(r->body)["error"]["code"], "rate_limit_exceeded");
  // Another key has slots of its own; a request that takes no slot is never limited.
  EXPECT_FALSE(k.Admit("", "b", true, false, &other).has_value());
  EXPECT_FALSE(k.Admit("", "a", false, false, &three).has_value());
  EXPECT_EQ(three.lease, nullptr);
  std::shared_ptr<void> copy = one.lease;
  one.lease.reset();
  EXPECT_EQ(k.InUse("a"), 2);  // a copy still holds it
  copy.reset();
  EXPECT_EQ(k.InUse("a"), 1);
  EXPECT_FALSE(k.Admit("", "a", true, false, &three).has_value());
  EXPECT_EQ(k.InUse("a"), 2);
}

TEST(ApiKeys, ReloadReplacesFileKeysAndKeepsThemOnABadFile) {
  const std::string dir = testing::MakeTempDir("em-keys");
  const std::string path = dir + "/keys";
  std::ofstream(path) << "old-key old-tenant\n";
  auto keys = ApiKeys::Create({"fixed:f"}, path, 0);
  ASSERT_TRUE(keys.ok()) << keys.status();
  ApiKeys& k = **keys;
  Admission a;
  EXPECT_FALSE(k.Admit("", "old-key", false, false, &a).has_value());
  EXPECT_EQ(a.tenant, "old-tenant");

  std::ofstream(path, std::ios::trunc) << "new-key new-tenant\n";
  ASSERT_TRUE(k.Reload().ok());
  EXPECT_TRUE(k.Admit("", "old-key", false, false, &a).has_value());
  EXPECT_FALSE(k.Admit("", "new-key", false, false, &a).has_value());
  EXPECT_EQ(a.tenant, "new-tenant");
  EXPECT_FALSE(k.Admit("", "fixed", false, false, &a).has_value());

  std::ofstream(path, std::ios::trunc) << "x y z\n";
  absl::Status s = k.Reload();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find(path + ":1:"), std::string::npos) << s;
  EXPECT_FALSE(k.Admit("", "new-key", false, false, &a).has_value());

  // An empty file keeps the gateway closed (only the fixed key is left).
  std::ofstream(path, std::ios::trunc) << "# nobody\n";
  ASSERT_TRUE(k.Reload().ok());
  EXPECT_FALSE(k.open());
  EXPECT_TRUE(k.Admit("", "new-key", false, false, &a).has_value());
  std::remove(path.c_str());
  EXPECT_FALSE(k.Reload().ok());
  EXPECT_FALSE(k.Admit("", "fixed", false, false, &a).has_value());
  std::remove(dir.c_str());

  EXPECT_FALSE(ApiKeys::Create({}, dir + "/missing", 0).ok());
  EXPECT_FALSE(ApiKeys::Create({}, "", -1).ok());
}

}  // namespace
}  // namespace expertmesh::gateway
