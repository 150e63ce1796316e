#include "core/base/flags.h"

#include <map>
#include <string>
#include <vector>

#include "core/base/mapped_file.h"
#include "gtest/gtest.h"

namespace expertmesh::base {
namespace {

struct Args {
  explicit Args(std::vector<std::string> a) : strings(std::move(a)) {
    for (std::string& s : strings) ptrs.push_back(s.data());
  }
  int argc() { return static_cast<int>(ptrs.size()); }
  char** argv() { return ptrs.data(); }
  std::vector<std::string> strings;
  std::vector<char*> ptrs;
};

TEST(FlagSetTest, ParsesBothFormsAndBools) {
  std::string listen = "127.0.0.1:0";
  int64_t lease = 10000;
  bool verbose = false;
  FlagSet flags("prog", "test");
  flags.AddString("listen", &listen, "");
  flags.AddInt("lease-ms", &lease, "");
  flags.AddBool("verbose", &verbose, "");
  Args args({"prog", "--listen=0.0.0.0:5", "--lease-ms", "1500", "--verbose"});
  ASSERT_TRUE(flags.Parse(args.argc(), args.argv()).ok());
  EXPECT_EQ(listen, "0.0.0.0:5");
  EXPECT_EQ(lease, 1500);
  EXPECT_TRUE(verbose);
}

TEST(FlagSetTest, RepeatableFlagAppendsEveryOccurrence) {
  std::vector<std::string> keys;
  std::string other;
  FlagSet flags("prog", "test");
  flags.AddStringList("api-key", &keys, "");
  flags.AddString("other", &other, "");
  Args args({"prog", "--api-key=a:t1", "--other", "x", "--api-key", "b"});
  ASSERT_TRUE(flags.Parse(args.argc(), args.argv()).ok());
  EXPECT_EQ(keys, (std::vector<std::string>{"a:t1", "b"}));
  EXPECT_EQ(other, "x");
}

TEST(FlagSetTest, RejectsUnknownAndBadValuesNamingTheFlag) {
  int64_t lease = 1;
  FlagSet flags("prog", "test");
  flags.AddInt("lease-ms", &lease, "");
  Args unknown({"prog", "--lease=3"});
  absl::Status s = flags.Parse(unknown.argc(), unknown.argv());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("--lease"), std::string::npos);
  Args bad({"prog", "--lease-ms=abc"});
  s = flags.Parse(bad.argc(), bad.argv());
  EXPECT_NE(std::string(s.message()).find("--lease-ms"), std::string::npos);
  EXPECT_EQ(lease, 1);
}

TEST(FlagSetTest, ConfigFileIsOverriddenByFlags) {
  const std::string path = ::testing::TempDir() + "/svc.conf";
  ASSERT_TRUE(base::WriteFileAtomically(path, "# comment\nlisten = 1.2.3.4:9\nlease-ms=42\n").ok());
  std::string listen = "x";
  int64_t lease = 1;
  FlagSet flags("prog", "test");
  flags.AddString("listen", &listen, "");
  flags.AddInt("lease-ms", &lease, "");
  Args args({"prog", "--lease-ms=7", "--config", path});
  ASSERT_TRUE(flags.Parse(args.argc(), args.argv()).ok());
  EXPECT_EQ(listen, "1.2.3.4:9");
  EXPECT_EQ(lease, 7);
}

TEST(FlagSetTest, JsonConfigAndUnknownKeyNamesTheFile) {
  const std::string path = ::testing::TempDir() + "/svc.json";
  ASSERT_TRUE(base::WriteFileAtomically(path, R"({"lease-ms": 99, "listen": "h:1"})").ok());
  std::string listen;
  int64_t lease = 1;
  FlagSet flags("prog", "test");
  flags.AddString("listen", &listen, "");
  flags.AddInt("lease-ms", &lease, "");
  Args args({"prog", "--config=" + path});
  ASSERT_TRUE(flags.Parse(args.argc(), args.argv()).ok());
  EXPECT_EQ(lease, 99);
  EXPECT_EQ(listen, "h:1");

  ASSERT_TRUE(base::WriteFileAtomically(path, "bogus = 1\n").ok());
  absl::Status s = flags.Parse(args.argc(), args.argv());
  EXPECT_NE(std::string(s.message()).find("bogus"), std::string::npos);
  EXPECT_NE(std::string(s.message()).find(path), std::string::npos);
}

TEST(ConfigTextTest, RejectsMalformedLines) {
  std::map<std::string, std::string> out;
  EXPECT_FALSE(ParseConfigText("a = 1\njust words\n", &out).ok());
  EXPECT_FALSE(ParseConfigText("{\"a\": [1]}", &out).ok());
  EXPECT_FALSE(ParseConfigText("{ broken", &out).ok());
}

}  // namespace
}  // namespace expertmesh::base
