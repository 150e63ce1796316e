#include "core/base/log.h"

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace expertmesh::base {
namespace {

TEST(LogTest, LineIsOneJsonObjectWithFields) {
  std::string line = FormatLogLine(LogLevel::kWarning, "router", "member \"dropped\"\n",
                                   {{"worker", "w-1"}, {"lease_ms", 3000}, {"ok", false}});
  ASSERT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1);
  auto j = nlohmann::json::parse(line);
  EXPECT_EQ(j["level"], "warning");
  EXPECT_EQ(j["component"], "router");
  EXPECT_EQ(j["msg"], "member \"dropped\"\n");
  EXPECT_EQ(j["worker"], "w-1");
  EXPECT_EQ(j["lease_ms"], 3000);
  EXPECT_EQ(j["ok"], false);
}

TEST(LogTest, InvalidUtf8IsReplacedNotThrown) {
  std::string line = FormatLogLine(LogLevel::kInfo, "x", std::string("bad \xff byte"), {});
  EXPECT_NO_THROW(nlohmann::json::parse(line));
}

TEST(LogTest, ParseLogLevel) {
  LogLevel level;
  EXPECT_TRUE(ParseLogLevel("debug", &level));
  EXPECT_EQ(level, LogLevel::kDebug);
  EXPECT_FALSE(ParseLogLevel("verbose", &level));
}

}  // namespace
}  // namespace expertmesh::base
