// `expertmesh`: one multi-command entry point. Only dispatch lives here.
#include <cstdio>
#include <cstring>
#include <string_view>

#include "cli/commands.h"

namespace {

struct Command {
  const char* name;
  int (*run)(int, char**);
  const char* help;
};

constexpr Command kCommands[] = {
    {"up", expertmesh::cli::RunUp, "start the local cluster on loopback and serve the API"},
    {"make-model", expertmesh::cli::RunMakeModel, "write a DeepSeek-V4-shaped checkpoint from a preset"},
    {"score", expertmesh::cli::RunScore, "compute logits for input ids (golden-compatible)"},
    {"generate", expertmesh::cli::RunGenerate, "single-process generation with the reference engine"},
    {"tokenize", expertmesh::cli::RunTokenize, "JSON Lines {text} -> {ids}"},
    {"detokenize", expertmesh::cli::RunDetokenize, "JSON Lines {ids} -> {text}"},
    {"chat-encode", expertmesh::cli::RunChatEncode, "JSON Lines {messages, options} -> {prompt, ids}"},
    {"chat-parse", expertmesh::cli::RunChatParse, "JSON Lines {completion, thinking_mode} -> {parsed}"},
};

void PrintUsage(FILE* out) {
  std::fprintf(out, "usage: expertmesh <command> [options]\n\ncommands:\n");
  for (const Command& c : kCommands) std::fprintf(out, "  %-12s %s\n", c.name, c.help);
  std::fprintf(out, "\nRun `expertmesh <command> --help` for a command's options.\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    PrintUsage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  std::string_view name = argv[1];
  for (const Command& c : kCommands) {
    if (name == c.name) return c.run(argc - 1, argv + 1);
  }
  std::fprintf(stderr, "expertmesh: unknown command '%s'\n\n", argv[1]);
  PrintUsage(stderr);
  return 2;
}
