// `expertmesh tokenize` / `expertmesh detokenize`: JSON Lines filters over the tokenizer. One
// output line per input line, in order; a bad line gets {"error": ...} and the rest go on.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/tokenizer/tokenizer.h"

namespace expertmesh::cli {
namespace {

using nlohmann::json;
using tokenizer::Tokenizer;

struct Args {
  std::string tokenizer_path;  // empty: the default (DeepSeek-V4) tokenizer
};

void PrintHelp(const char* command, bool encode) {
  std::printf(
      "usage: expertmesh %s [--tokenizer FILE]\n\n"
      "Reads JSON Lines on stdin and writes one JSON line per input line on stdout, in order:\n"
      "  %s\n"
      "A bad line (invalid JSON, missing or mistyped field%s) gets {\"error\": \"...\"} on its\n"
      "line and the others go on.\n\n"
      "options:\n"
      "  --tokenizer FILE  a Hugging Face tokenizer.json, loaded as it is. Default: the\n"
      "                    DeepSeek-V4 tokenizer ($EXPERTMESH_TOKENIZER or the V3 file that\n"
      "                    scripts/setup.sh installs, plus the V4 control tokens).\n",
      command,
      encode ? "{\"text\": STRING} -> {\"ids\": [INT, ...]}   (no BOS added; added-token text "
               "such as <｜User｜> becomes its id)"
             : "{\"ids\": [INT, ...]} -> {\"text\": STRING}",
      encode ? "" : ", id out of range");
}

// Returns 0 to go on, or 1 + exit code to stop (help or usage error).
int ParseArgs(int argc, char** argv, bool encode, Args* args) {
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    if (std::strcmp(a, "--help") == 0 || std::strcmp(a, "-h") == 0) {
      PrintHelp(argv[0], encode);
      return 1;
    }
    if (std::strcmp(a, "--tokenizer") == 0) {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "expertmesh %s: --tokenizer needs a FILE\n", argv[0]);
        return 3;
      }
      args->tokenizer_path = argv[++i];
      continue;
    }
    if (std::strncmp(a, "--tokenizer=", 12) == 0) {
      args->tokenizer_path = a + 12;
      continue;
    }
    std::fprintf(stderr, "expertmesh %s: unknown argument '%s' (see --help)\n", argv[0], a);
    return 3;
  }
  return 0;
}

std::string ErrorLine(const std::string& message) {
  return json{{"error", message}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string EncodeLine(const Tokenizer& tok, const std::string& line) {
  json in = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (in.is_discarded()) return ErrorLine("invalid JSON");
  if (!in.is_object()) return ErrorLine("expected an object {\"text\": ...}");
  auto it = in.find("text");
  if (it == in.end()) return ErrorLine("missing field 'text'");
  if (!it->is_string()) return ErrorLine("field 'text' must be a string");
  const std::vector<int32_t> ids = tok.Encode(it->get_ref<const std::string&>());
  std::string out = "{\"ids\":[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i > 0) out.push_back(',');
    out.append(std::to_string(ids[i]));
  }
  out.append("]}");
  return out;
}

std::string DecodeLine(const Tokenizer& tok, const std::string& line) {
  json in = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (in.is_discarded()) return ErrorLine("invalid JSON");
  if (!in.is_object()) return ErrorLine("expected an object {\"ids\": [...]}");
  auto it = in.find("ids");
  if (it == in.end()) return ErrorLine("missing field 'ids'");
  if (!it->is_array()) return ErrorLine("field 'ids' must be an array of integers");
  std::vector<int32_t> ids;
  ids.reserve(it->size());
  for (size_t i = 0; i < it->size(); ++i) {
    const json& v = (*it)[i];
    if (!v.is_number_integer()) {
      return ErrorLine("ids[" + std::to_string(i) + "] is not an integer");
    }
    const int64_t id =
        v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX ? INT64_MAX : v.get<int64_t>();
    if (id < 0 || id >= tok.vocab_size()) {
      return ErrorLine("ids[" + std::to_string(i) + "] = " + v.dump() + " is out of range [0, " +
                       std::to_string(tok.vocab_size()) + ")");
    }
    ids.push_back(static_cast<int32_t>(id));
  }
  return json{{"text", tok.Decode(ids)}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

int RunFilter(int argc, char** argv, bool encode) {
  Args args;
  if (int stop = ParseArgs(argc, argv, encode, &args); stop != 0) return stop - 1;
  auto tok = tokenizer::LoadTokenizer(args.tokenizer_path);
  if (!tok.ok()) {
    std::fprintf(stderr, "expertmesh %s: %s\n", argv[0],
                 std::string(tok.status().message()).c_str());
    return 1;
  }
  std::ios::sync_with_stdio(false);
  std::string line;
  while (std::getline(std::cin, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    std::string out = encode ? EncodeLine(**tok, line) : DecodeLine(**tok, line);
    out.push_back('\n');
    std::fwrite(out.data(), 1, out.size(), stdout);
    // Flushed per line so that a client holding a pipe open gets each answer at once.
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int RunTokenize(int argc, char** argv) { return RunFilter(argc, argv, /*encode=*/true); }
int RunDetokenize(int argc, char** argv) { return RunFilter(argc, argv, /*encode=*/false); }

}  // namespace expertmesh::cli
