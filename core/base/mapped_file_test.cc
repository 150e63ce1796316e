#include "core/base/mapped_file.h"

#include <unistd.h>

#include "gtest/gtest.h"

namespace expertmesh::base {
namespace {

std::string TempPath(const char* name) {
  return std::string(::testing::TempDir()) + "/" + name + "." + std::to_string(::getpid());
}

TEST(MappedFileTest, MapsWrittenContents) {
  std::string path = TempPath("mapped");
  ASSERT_TRUE(WriteFileAtomically(path, "hello expertmesh").ok());
  auto mapped = MappedFile::Open(path);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  EXPECT_EQ((*mapped)->view(), "hello expertmesh");
  auto text = ReadFileToString(path);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, "hello expertmesh");
  ::unlink(path.c_str());
}

TEST(MappedFileTest, MissingFileIsNotFoundAndNamesPath) {
  auto mapped = MappedFile::Open("/nonexistent/dir/model.safetensors");
  ASSERT_FALSE(mapped.ok());
  EXPECT_EQ(mapped.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(mapped.status().message().find("/nonexistent/dir/model.safetensors"), std::string::npos);
}

TEST(MappedFileTest, EmptyFileMapsToEmptyView) {
  std::string path = TempPath("empty");
  ASSERT_TRUE(WriteFileAtomically(path, "").ok());
  auto mapped = MappedFile::Open(path);
  ASSERT_TRUE(mapped.ok());
  EXPECT_EQ((*mapped)->size(), 0u);
  ::unlink(path.c_str());
}

}  // namespace
}  // namespace expertmesh::base
