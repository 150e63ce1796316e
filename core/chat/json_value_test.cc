#include "core/chat/json_value.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>

namespace expertmesh::chat {
namespace {

std::string Dump(std::string_view json) {
  absl::StatusOr<JsonValue> v = ParseJson(json);
  EXPECT_TRUE(v.ok()) << v.status() << " for " << json;
  return v.ok() ? v->DumpPython() : "";
}

// Expected strings are what CPython 3 prints for json.dumps(json.loads(x), ensure_ascii=False).
TEST(JsonValueTest, NumbersPrintLikePython) {
  EXPECT_EQ(Dump("1"), "1");
  EXPECT_EQ(Dump("-0"), "0");
  EXPECT_EQ(Dump("12345678901234567890123"), "12345678901234567890123");
  EXPECT_EQ(Dump("1.0"), "1.0");
  EXPECT_EQ(Dump("-0.0"), "-0.0");
  EXPECT_EQ(Dump("1e5"), "100000.0");
  EXPECT_EQ(Dump("1E2"), "100.0");
  EXPECT_EQ(Dump("0.1"), "0.1");
  EXPECT_EQ(Dump("1e15"), "1000000000000000.0");
  EXPECT_EQ(Dump("1e16"), "1e+16");
  EXPECT_EQ(Dump("123456789012345678.0"), "1.2345678901234568e+17");
  EXPECT_EQ(Dump("0.0001"), "0.0001");
  EXPECT_EQ(Dump("0.00001"), "1e-05");
  EXPECT_EQ(Dump("1.5e-7"), "1.5e-07");
  EXPECT_EQ(Dump("1.5e300"), "1.5e+300");
  EXPECT_EQ(Dump("5e-324"), "5e-324");
  EXPECT_EQ(Dump("1e400"), "Infinity");
  EXPECT_EQ(Dump("-1e400"), "-Infinity");
  EXPECT_EQ(Dump("NaN"), "NaN");
  EXPECT_EQ(Dump("2.50"), "2.5");
  EXPECT_EQ(Dump("123.456"), "123.456");
}

TEST(JsonValueTest, ContainersAndStringsPrintLikePython) {
  EXPECT_EQ(Dump(R"({"b": [1, true, null, {}], "a": "x"})"),
            R"({"b": [1, true, null, {}], "a": "x"})");
  EXPECT_EQ(Dump(R"({"k":"\u00e9\ud83d\ude00\n\t\u0001\"\\\/"})"),
            "{\"k\": \"é😀\\n\\t\\u0001\\\"\\\\/\"}");
  EXPECT_EQ(Dump("[]"), "[]");
  EXPECT_EQ(Dump(R"("\u007f")"), "\"\x7f\"");
}

TEST(JsonValueTest, DuplicateKeysKeepFirstPositionAndLastValue) {
  EXPECT_EQ(Dump(R"({"a": 1, "b": 2, "a": 3})"), R"({"a": 3, "b": 2})");
  std::string big = "{";
  for (int i = 0; i < 20; ++i) big += "\"k" + std::to_string(i) + "\": " + std::to_string(i) + ", ";
  big += "\"k3\": 99}";
  std::string dumped = Dump(big);
  EXPECT_NE(dumped.find("\"k3\": 99, \"k4\""), std::string::npos) << dumped;
}

TEST(JsonValueTest, RejectsMalformedInput) {
  for (const char* bad : {"", "{", "[1,]", "{\"a\" 1}", "01", "1.", "\"\x01\"", "\"\xff\"", "tru",
                          "[1] x", "{\"a\":1,}", "-", "1e", "\"\\x\""}) {
    EXPECT_FALSE(ParseJson(bad).ok()) << bad;
  }
  std::string deep(600, '[');
  EXPECT_FALSE(ParseJson(deep).ok());
}

TEST(JsonValueTest, InvalidUtf8IsReplacedWhenWriting) {
  EXPECT_EQ(PythonJsonString("a\xff"
                             "b"),
            "\"a\xEF\xBF\xBD"
            "b\"");
}

TEST(JsonValueTest, FuzzNeverCrashesAndRoundTrips) {
  std::mt19937_64 rng(7);
  const std::string alphabet = "{}[],:\"\\ 0123456789.eE+-truefalsnNIfy\x01\xc3\xa9u";
  for (int iter = 0; iter < 20000; ++iter) {
    std::string s;
    int len = rng() % 24;
    for (int i = 0; i < len; ++i) s.push_back(alphabet[rng() % alphabet.size()]);
    absl::StatusOr<JsonValue> v = ParseJson(s);
    if (!v.ok()) continue;
    // A parsed value printed and parsed again prints the same.
    std::string once = v->DumpPython();
    absl::StatusOr<JsonValue> again = ParseJson(once);
    ASSERT_TRUE(again.ok()) << once;
    EXPECT_EQ(again->DumpPython(), once);
  }
}

}  // namespace
}  // namespace expertmesh::chat
