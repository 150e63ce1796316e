#include "core/tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/base/utf8.h"

namespace expertmesh::tokenizer {
namespace {

// Unicode White_Space (PropList.txt), written for use inside a PCRE2 character class.
constexpr std::string_view kWhiteSpaceRanges =
    "\\x{09}-\\x{0D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
    "\\x{202F}\\x{205F}\\x{3000}";

struct CodeDeleter {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
};
struct MatchDataDeleter {
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};
struct MatchContextDeleter {
  void operator()(pcre2_match_context* c) const { pcre2_match_context_free(c); }
};
struct JitStackDeleter {
  void operator()(pcre2_jit_stack* s) const { pcre2_jit_stack_free(s); }
};

// Per-thread match state. One match-data block serves every pattern: callers copy the offsets
// out before the next match. The JIT stack is larger than PCRE2's 32 KiB default so that long
// runs of one class cannot exhaust it.
struct ThreadMatchState {
  std::unique_ptr<pcre2_match_data, MatchDataDeleter> data{pcre2_match_data_create(1, nullptr)};
  std::unique_ptr<pcre2_jit_stack, JitStackDeleter> jit_stack{
      pcre2_jit_stack_create(64 * 1024, 8 * 1024 * 1024, nullptr)};
  std::unique_ptr<pcre2_match_context, MatchContextDeleter> context{
      pcre2_match_context_create(nullptr)};
  ThreadMatchState() {
    if (context && jit_stack) pcre2_jit_stack_assign(context.get(), nullptr, jit_stack.get());
  }
};

ThreadMatchState& MatchState() {
  thread_local ThreadMatchState state;
  return state;
}

std::string Pcre2Message(int code) {
  PCRE2_UCHAR buffer[256];
  if (pcre2_get_error_message(code, buffer, sizeof(buffer)) < 0) return absl::StrCat("code ", code);
  return std::string(reinterpret_cast<const char*>(buffer));
}

}  // namespace

absl::StatusOr<std::string> TranslatePattern(std::string_view p) {
  std::string out;
  out.reserve(p.size() + 64);
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\') {
      if (i + 1 >= p.size()) return absl::InvalidArgumentError("pattern ends with a lone '\\'");
      const char e = p[++i];
      switch (e) {
        case 's':
          if (in_class) {
            out.append(kWhiteSpaceRanges);
          } else {
            absl::StrAppend(&out, "[", std::string(kWhiteSpaceRanges), "]");
          }
          break;
        case 'S':
          if (in_class) {
            return absl::InvalidArgumentError(
                absl::StrCat("pattern uses \\S inside a character class at offset ", i - 1,
                             ", which is not supported"));
          }
          absl::StrAppend(&out, "[^", std::string(kWhiteSpaceRanges), "]");
          break;
        case 'd':
          out.append("\\p{Nd}");
          break;
        case 'D':
          if (in_class) {
            return absl::InvalidArgumentError(absl::StrCat(
                "pattern uses \\D inside a character class at offset ", i - 1, ", unsupported"));
          }
          out.append("\\P{Nd}");
          break;
        case 'w':
        case 'W':
        case 'b':
        case 'B':
        case 'h':
        case 'H':
          return absl::InvalidArgumentError(
              absl::StrCat("pattern uses \\", std::string(1, e), " at offset ", i - 1,
                           ": its Unicode meaning differs between the reference engine and "
                           "PCRE2, so it is not supported"));
        default:
          out.push_back('\\');
          out.push_back(e);
          break;
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out.push_back(c);
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      if (i + 1 < p.size() && p[i + 1] == '^') out.push_back(p[++i]);
      if (i + 1 < p.size() && p[i + 1] == ']') out.push_back(p[++i]);
      continue;
    }
    if (in_class && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {
      const size_t close = p.find(":]", i + 2);
      if (close == std::string_view::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat("pattern has an unterminated POSIX class at offset ", i));
      }
      out.append(p.substr(i, close + 2 - i));
      i = close + 1;
      continue;
    }
    if (in_class && c == '[') {
      return absl::InvalidArgumentError(absl::StrCat("pattern nests a character class at offset ",
                                                     i, ", which is not supported"));
    }
    if (in_class && c == ']') in_class = false;
    out.push_back(c);
  }
  if (in_class) return absl::InvalidArgumentError("pattern has an unterminated character class");
  return out;
}

struct Regex::Impl {
  std::unique_ptr<pcre2_code, CodeDeleter> code;
  bool jit = false;
};

Regex::Regex(std::string pattern, std::unique_ptr<Impl> impl)
    : pattern_(std::move(pattern)), impl_(std::move(impl)) {}
Regex::~Regex() = default;

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(std::string_view pattern, bool literal) {
  if (!base::IsValidUtf8(pattern)) return absl::InvalidArgumentError("pattern is not valid UTF-8");
  int error = 0;
  PCRE2_SIZE offset = 0;
  uint32_t options = PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK;
  if (literal) options |= PCRE2_LITERAL;
  pcre2_code* raw = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                  options, &error, &offset, nullptr);
  if (raw == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("pattern does not compile at offset ", offset, ": ", Pcre2Message(error)));
  }
  auto impl = std::make_unique<Impl>();
  impl->code.reset(raw);
  // Without JIT the interpreter still gives the same matches, only slower.
  impl->jit = pcre2_jit_compile(raw, PCRE2_JIT_COMPLETE) == 0;
  return std::unique_ptr<Regex>(new Regex(std::string(pattern), std::move(impl)));
}

bool Regex::Find(std::string_view subject, size_t start, size_t* match_begin,
                 size_t* match_end) const {
  ThreadMatchState& state = MatchState();
  const auto* s = reinterpret_cast<PCRE2_SPTR>(subject.data());
  while (start < subject.size()) {
    int rc = pcre2_match(impl_->code.get(), s, subject.size(), start, PCRE2_NO_UTF_CHECK,
                         state.data.get(), state.context.get());
    if (rc < 0 && rc != PCRE2_ERROR_NOMATCH && impl_->jit) {
      // A JIT resource limit: the interpreter has its own (heap-based) limits.
      rc = pcre2_match(impl_->code.get(), s, subject.size(), start,
                       PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, state.data.get(), state.context.get());
    }
    if (rc < 0) return false;
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(state.data.get());
    if (ov[1] > ov[0]) {
      *match_begin = ov[0];
      *match_end = ov[1];
      return true;
    }
    // An empty match yields no piece; search again one character further on.
    size_t next = ov[1];
    if (next >= subject.size()) return false;
    next += base::NextUtf8(subject.substr(next)).length;
    start = next;
  }
  return false;
}

}  // namespace expertmesh::tokenizer
