#include "core/chat/parser.h"

#include <algorithm>
#include <initializer_list>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/base/hash.h"
#include "core/chat/encoder.h"
#include "core/chat/json_value.h"

namespace expertmesh::chat {
namespace {

constexpr std::string_view kToolsStart = "\n\n<｜DSML｜tool_calls";
constexpr std::string_view kInvokeOpen = ">\n<｜DSML｜invoke";
constexpr std::string_view kToolsClose = ">\n</｜DSML｜tool_calls>";
constexpr std::string_view kParamMarker = "<｜DSML｜parameter";
constexpr std::string_view kInvokeEnd = "</｜DSML｜invoke";
constexpr std::string_view kParamName = " name=\"";
constexpr std::string_view kStringTrue = "\" string=\"true\">";
constexpr std::string_view kStringFalse = "\" string=\"false\">";
constexpr std::string_view kParamStop = "/｜DSML｜parameter";
constexpr std::string_view kNextParam = ">\n<｜DSML｜parameter";
constexpr std::string_view kInvokeClose = ">\n</｜DSML｜invoke";

struct Found {
  size_t pos;
  int which = -1;         // index of the marker; -1: none (pos == text size)
  bool complete = false;  // false: text[pos:] is a proper prefix of marker `which`
};

// The earliest position at or after `from` where a marker occurs whole, or where the rest of the
// text is a proper prefix of a marker (it may still become one, so nothing from there on is
// decided). No marker of a set is a prefix of another, so the two cannot meet at one position.
Found FindMarker(std::string_view text, size_t from,
                 std::initializer_list<std::string_view> markers) {
  Found best{text.size()};
  int i = 0;
  for (std::string_view m : markers) {
    size_t p = text.find(m, from);
    if (p != std::string_view::npos && p < best.pos) best = Found{p, i, true};
    size_t avail = text.size() - std::min(text.size(), from);
    for (size_t k = std::min(m.size() - 1, avail); k > 0; --k) {
      size_t start = text.size() - k;
      if (start >= best.pos) break;
      if (text.compare(start, k, m, 0, k) == 0) {
        best = Found{start, i, false};
        break;
      }
    }
    ++i;
  }
  return best;
}

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

// Python's str.isspace() (what `\s` matches in the official parser's regexes) for the UTF-8
// character at s[i]; returns its length, 0 when it is not whitespace.
size_t PythonSpaceLength(std::string_view s, size_t i) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  if ((c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20)) return 1;
  const auto at = [&](std::string_view seq) { return s.compare(i, seq.size(), seq) == 0; };
  if (at("\xC2\x85") || at("\xC2\xA0")) return 2;
  if (at("\xE1\x9A\x80") || at("\xE2\x80\xA8") || at("\xE2\x80\xA9") || at("\xE2\x80\xAF") ||
      at("\xE2\x81\x9F") || at("\xE3\x80\x80")) {
    return 3;
  }
  if (i + 2 < s.size() && c == 0xE2 && static_cast<unsigned char>(s[i + 1]) == 0x80) {
    unsigned char c2 = static_cast<unsigned char>(s[i + 2]);
    if (c2 >= 0x80 && c2 <= 0x8A) return 3;  // U+2000..U+200A
  }
  return 0;
}

}  // namespace

std::string_view ParseErrorName(ParseError e) {
  switch (e) {
    case ParseError::kNone:
      return "none";
    case ParseError::kMissingEos:
      return "missing_eos";
    case ParseError::kMissingThinkEnd:
      return "missing_think_end";
    case ParseError::kUnexpectedToken:
      return "unexpected_token";
    case ParseError::kMalformedToolCalls:
      return "malformed_tool_calls";
    case ParseError::kTextAfterEnd:
      return "text_after_end";
  }
  return "?";
}

JsonValue ParsedMessage::ToJson(bool with_ids) const {
  std::vector<JsonValue> calls;
  for (const ParsedToolCall& c : tool_calls) {
    std::vector<JsonValue::Member> call;
    if (with_ids) call.emplace_back("id", JsonValue::String(c.id));
    call.emplace_back("type", JsonValue::String(c.type));
    call.emplace_back("function",
                      JsonValue::Object({{"name", JsonValue::String(c.name)},
                                         {"arguments", JsonValue::String(c.arguments)}}));
    calls.push_back(JsonValue::Object(std::move(call)));
  }
  return JsonValue::Object({{"role", JsonValue::String("assistant")},
                            {"content", JsonValue::String(content)},
                            {"reasoning_content", JsonValue::String(reasoning_content)},
                            {"tool_calls", JsonValue::Array(std::move(calls))}});
}

StreamParser::StreamParser(ParseOptions options)
    : options_(std::move(options)),
      state_(options_.thinking_mode == ThinkingMode::kThinking ? State::kReasoning
                                                               : State::kContent) {}

std::string StreamParser::MakeId(size_t index) const {
  static constexpr char kHex[] = "0123456789abcdef";
  uint64_t v = base::SplitMix64Hash(options_.id_seed ^ base::SplitMix64Hash(index));
  std::string id = options_.id_prefix;
  for (int shift = 60; shift >= 0; shift -= 4) id.push_back(kHex[(v >> shift) & 15]);
  return id;
}

void StreamParser::Represent() {
  buf_.erase(0, cur_);
  cur_ = 0;
  scan_from_ = 0;
}

void StreamParser::Enter(State s) {
  state_ = s;
  scan_from_ = 0;
}

void StreamParser::Fail(ParseError e, std::string message) {
  if (message_.error == ParseError::kNone) {
    message_.error = e;
    message_.error_message = std::move(message);
  }
  state_ = State::kRaw;
}

void StreamParser::EmitText(std::string_view text, bool reasoning, StreamDelta* d) {
  if (text.empty()) return;
  (reasoning ? message_.reasoning_content : message_.content).append(text);
  (reasoning ? d->reasoning_content : d->content).append(text);
}

void StreamParser::EmitArguments(std::string_view fragment, StreamDelta* d) {
  if (fragment.empty()) return;
  const int index = static_cast<int>(message_.tool_calls.size()) - 1;
  message_.tool_calls.back().arguments.append(fragment);
  if (d->tool_calls.empty() || d->tool_calls.back().index != index) {
    d->tool_calls.push_back(ToolCallDelta{index, "", "", ""});
  }
  d->tool_calls.back().arguments.append(fragment);
}

StreamDelta StreamParser::Feed(std::string_view bytes) {
  StreamDelta d;
  if (finished_) return d;
  buf_.append(bytes);
  Run(&d);
  return d;
}

void StreamParser::Run(StreamDelta* d) {
  while (true) {
    bool more = false;
    switch (state_) {
      case State::kReasoning:
        more = StepText(d, true);
        break;
      case State::kContent:
        more = StepText(d, false);
        break;
      case State::kToolsOpen:
        more = StepToolsOpen(d);
        break;
      case State::kInvokeHeader:
        more = StepInvokeHeader(d);
        break;
      case State::kParamHeader:
        more = StepParamHeader(d);
        break;
      case State::kParamValue:
        more = StepParamValue(d);
        break;
      case State::kParamClose:
        more = StepParamClose(d);
        break;
      case State::kToolsEnd:
        more = StepToolsEnd(d);
        break;
      case State::kDone:
        if (buf_.size() > cur_) {
          Fail(ParseError::kTextAfterEnd, "text after the end of the message");
          more = true;
        }
        break;
      case State::kRaw:
        StepRaw(d, false);
        break;
    }
    if (!more) return;
  }
}

bool StreamParser::StepText(StreamDelta* d, bool reasoning) {
  // The official parser reads reasoning up to </think> and content up to EOS or the tool-call
  // block, then rejects either when it holds another special string. The first two markers of
  // each list end the text normally.
  const Found f =
      reasoning ? FindMarker(buf_, cur_, {kThinkEnd, kEos, kToolsStart, kBos, kThinkStart, kDsml})
                : FindMarker(buf_, cur_, {kEos, kToolsStart, kBos, kThinkStart, kThinkEnd, kDsml});
  EmitText(std::string_view(buf_).substr(cur_, f.pos - cur_), reasoning, d);
  cur_ = f.pos;
  Represent();
  if (!f.complete) return false;
  if (reasoning && f.which == 0) {  // </think>
    cur_ += kThinkEnd.size();
    Represent();
    Enter(State::kContent);
    return true;
  }
  if ((reasoning && f.which == 1) || (!reasoning && f.which == 0)) {  // EOS
    // The EOS stays in buf_ (not represented) so that text after it keeps it when it turns raw.
    cur_ += kEos.size();
    if (reasoning && message_.error == ParseError::kNone) {
      message_.error = ParseError::kMissingThinkEnd;
      message_.error_message = "the completion ended (EOS) before </think>";
    }
    Enter(State::kDone);
    return true;
  }
  if (!reasoning && f.which == 1) {  // the tool-call block
    cur_ += kToolsStart.size();
    Enter(State::kToolsOpen);
    return true;
  }
  if (reasoning && f.which == 2) {
    Fail(ParseError::kMissingThinkEnd, "tool calls before </think>");
    return true;
  }
  std::string_view token;
  for (std::string_view m : {kBos, kThinkStart, kThinkEnd, kDsml}) {
    if (StartsWith(buf_, m)) token = m;
  }
  Fail(ParseError::kUnexpectedToken, absl::StrCat("unexpected '", std::string(token), "' in ",
                                                  reasoning ? "reasoning" : "content"));
  return true;
}

bool StreamParser::StepToolsOpen(StreamDelta* d) {
  std::string_view t = std::string_view(buf_).substr(cur_);
  if (StartsWith(t, kInvokeOpen)) {
    cur_ += kInvokeOpen.size();
    Enter(State::kInvokeHeader);
    return true;
  }
  if (StartsWith(t, kToolsClose)) {
    cur_ += kToolsClose.size();
    Represent();
    Enter(State::kToolsEnd);
    return true;
  }
  if (StartsWith(kInvokeOpen, t) || StartsWith(kToolsClose, t)) return false;
  Fail(ParseError::kMalformedToolCalls,
       "tool calls: expected '>\\n' then '<｜DSML｜invoke' or '</｜DSML｜tool_calls>'");
  return true;
}

bool StreamParser::StepInvokeHeader(StreamDelta* d) {
  const Found f = FindMarker(buf_, std::max(cur_, scan_from_), {kParamMarker, kInvokeEnd});
  if (!f.complete) {
    scan_from_ = f.pos;
    return false;
  }
  // Official: `^\s*name="(.*?)">\n$` on the text before the marker.
  std::string_view h = std::string_view(buf_).substr(cur_, f.pos - cur_);
  size_t i = 0;
  while (i < h.size()) {
    size_t n = PythonSpaceLength(h, i);
    if (n == 0) break;
    i += n;
  }
  h.remove_prefix(i);
  constexpr std::string_view kName = "name=\"";
  constexpr std::string_view kEnd = "\">\n";
  // Python's `$` also matches before a final "\n", so `">\n\n` ends a header too.
  if (h.size() > kName.size() + kEnd.size() && h.back() == '\n' &&
      h.substr(h.size() - 1 - kEnd.size(), kEnd.size()) == kEnd) {
    h.remove_suffix(1);
  }
  if (!StartsWith(h, kName) || h.size() < kName.size() + kEnd.size() ||
      h.substr(h.size() - kEnd.size()) != kEnd) {
    Fail(ParseError::kMalformedToolCalls,
         "tool calls: bad invoke header (expected name=\"...\">\\n)");
    return true;
  }
  ParsedToolCall call;
  call.id = MakeId(message_.tool_calls.size());
  call.name = std::string(h.substr(kName.size(), h.size() - kName.size() - kEnd.size()));
  d->tool_calls.push_back(
      ToolCallDelta{static_cast<int>(message_.tool_calls.size()), call.id, call.name, ""});
  message_.tool_calls.push_back(std::move(call));
  param_names_.clear();
  // The header is represented by the delta; a parameter marker is not yet (a malformed
  // parameter turns raw with its marker).
  cur_ = f.pos;
  Represent();
  if (f.which == 0) {
    cur_ = kParamMarker.size();
    Enter(State::kParamHeader);
  } else {
    EmitArguments("{}", d);
    cur_ = kInvokeEnd.size();
    Represent();
    Enter(State::kToolsOpen);
  }
  return true;
}

bool StreamParser::StepParamHeader(StreamDelta* d) {
  std::string_view t = std::string_view(buf_).substr(cur_);
  if (t.size() < kParamName.size()) {
    if (StartsWith(kParamName, t)) return false;
  }
  if (!StartsWith(t, kParamName)) {
    Fail(ParseError::kMalformedToolCalls,
         "tool calls: bad parameter header (expected name=\"...\")");
    return true;
  }
  // Official: `^ name="(.*?)" string="(true|false)">(.*?)<$` on the text up to
  // `/｜DSML｜parameter`: the name ends at the first `" string="true|false">`.
  const size_t from = std::max(cur_ + kParamName.size(), scan_from_);
  const Found f = FindMarker(buf_, from, {kStringTrue, kStringFalse, kParamStop});
  if (!f.complete) {
    scan_from_ = f.pos;
    return false;
  }
  if (f.which == 2) {
    Fail(ParseError::kMalformedToolCalls,
         "tool calls: bad parameter header (expected string=\"true\" or string=\"false\")");
    return true;
  }
  std::string name = buf_.substr(cur_ + kParamName.size(), f.pos - cur_ - kParamName.size());
  if (std::find(param_names_.begin(), param_names_.end(), name) != param_names_.end()) {
    Fail(ParseError::kMalformedToolCalls,
         absl::StrCat("tool calls: duplicate parameter '", name, "'"));
    return true;
  }
  param_is_string_ = f.which == 0;
  std::string fragment = param_names_.empty() ? "{\"" : ", \"";
  AppendJsonEscaped(name, &fragment);
  fragment.append(param_is_string_ ? "\": \"" : "\": ");
  param_names_.push_back(std::move(name));
  EmitArguments(fragment, d);
  cur_ = f.pos + (param_is_string_ ? kStringTrue.size() : kStringFalse.size());
  Represent();
  Enter(State::kParamValue);
  return true;
}

bool StreamParser::StepParamValue(StreamDelta* d) {
  const Found f = FindMarker(buf_, cur_, {kParamStop});
  // The value ends with the '<' before the stop (or "<\n": Python's `$` also matches before a
  // final newline): hold back what may be that ending.
  size_t end = f.pos;
  if (end > cur_ && buf_[end - 1] == '<') {
    --end;
  } else if (end > cur_ + 1 && buf_[end - 1] == '\n' && buf_[end - 2] == '<') {
    end -= 2;
  }
  std::string_view value = std::string_view(buf_).substr(cur_, end - cur_);
  if (param_is_string_) {
    std::string escaped;
    AppendJsonEscaped(value, &escaped);
    EmitArguments(escaped, d);
  } else {
    EmitArguments(value, d);
  }
  cur_ = end;
  Represent();
  if (!f.complete) return false;
  if (buf_.empty() || buf_[0] != '<') {
    Fail(ParseError::kMalformedToolCalls,
         "tool calls: parameter value not closed by '</｜DSML｜parameter'");
    return true;
  }
  if (param_is_string_) EmitArguments("\"", d);
  cur_ = f.pos - end + kParamStop.size();
  Represent();
  Enter(State::kParamClose);
  return true;
}

bool StreamParser::StepParamClose(StreamDelta* d) {
  std::string_view t = std::string_view(buf_).substr(cur_);
  if (StartsWith(t, kNextParam)) {
    cur_ += kNextParam.size();
    Enter(State::kParamHeader);
    return true;
  }
  if (StartsWith(t, kInvokeClose)) {
    EmitArguments("}", d);
    cur_ += kInvokeClose.size();
    Represent();
    Enter(State::kToolsOpen);
    return true;
  }
  if (StartsWith(kNextParam, t) || StartsWith(kInvokeClose, t)) return false;
  Fail(ParseError::kMalformedToolCalls,
       "tool calls: expected '>\\n' then '<｜DSML｜parameter' or '</｜DSML｜invoke'");
  return true;
}

bool StreamParser::StepToolsEnd(StreamDelta* d) {
  std::string_view t = std::string_view(buf_).substr(cur_);
  if (t.empty()) return false;
  if (StartsWith(t, kEos)) {
    cur_ += kEos.size();
    Enter(State::kDone);
    return true;
  }
  if (StartsWith(kEos, t)) return false;
  Fail(ParseError::kTextAfterEnd, "text after the tool calls");
  return true;
}

void StreamParser::StepRaw(StreamDelta* d, bool finishing) {
  // Everything is content now, except that an EOS at the very end is the end of the message:
  // hold a trailing EOS or EOS prefix until it is known whether more text follows.
  std::string_view b = buf_;
  size_t hold = 0;
  if (b.size() >= kEos.size() && b.substr(b.size() - kEos.size()) == kEos) {
    hold = kEos.size();
  } else {
    for (size_t k = std::min(kEos.size() - 1, b.size()); k > 0; --k) {
      if (b.compare(b.size() - k, k, kEos, 0, k) == 0) {
        hold = k;
        break;
      }
    }
  }
  if (finishing && hold != kEos.size()) hold = 0;
  EmitText(b.substr(0, b.size() - hold), false, d);
  buf_.erase(0, b.size() - hold);
  cur_ = 0;
  if (finishing) buf_.clear();
}

StreamDelta StreamParser::Finish() {
  StreamDelta d;
  if (finished_) return d;
  finished_ = true;
  switch (state_) {
    case State::kReasoning:
      EmitText(std::string_view(buf_).substr(cur_), true, &d);
      if (message_.error == ParseError::kNone) {
        message_.error = ParseError::kMissingThinkEnd;
        message_.error_message = "the completion ended before </think>";
      }
      break;
    case State::kContent:
      EmitText(std::string_view(buf_).substr(cur_), false, &d);
      if (message_.error == ParseError::kNone) {
        message_.error = ParseError::kMissingEos;
        message_.error_message = "the completion ended without EOS";
      }
      break;
    case State::kToolsOpen:
    case State::kInvokeHeader:
    case State::kParamHeader:
    case State::kParamValue:
    case State::kParamClose:
      Fail(ParseError::kMalformedToolCalls, "tool calls: the block is not closed");
      StepRaw(&d, true);
      break;
    case State::kToolsEnd:
      if (buf_.size() > cur_) {
        Fail(ParseError::kTextAfterEnd, "text after the tool calls");
        StepRaw(&d, true);
      }
      break;
    case State::kDone:
      break;
    case State::kRaw:
      StepRaw(&d, true);
      break;
  }
  buf_.clear();
  cur_ = 0;
  return d;
}

ParsedMessage ParseCompletion(std::string_view text, const ParseOptions& options) {
  StreamParser parser(options);
  parser.Feed(text);
  parser.Finish();
  return parser.message();
}

}  // namespace expertmesh::chat
