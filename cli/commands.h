// The `expertmesh` CLI's subcommands, one file each (cli/cmd_<name>.cc). Each takes the
// arguments after the subcommand name and returns the process exit code.
#pragma once

namespace expertmesh::cli {

int RunUp(int argc, char** argv);          // cmd_up.cc: start the local cluster
int RunMakeModel(int argc, char** argv);   // cmd_make_model.cc: write a V4-shaped checkpoint
int RunScore(int argc, char** argv);       // cmd_score.cc: logits for input ids
int RunGenerate(int argc, char** argv);    // cmd_generate.cc: single-process generation
int RunTokenize(int argc, char** argv);    // cmd_tokenize.cc: JSONL text -> ids
int RunDetokenize(int argc, char** argv);  // cmd_tokenize.cc: JSONL ids -> text
int RunChatEncode(int argc, char** argv);  // cmd_chat.cc: JSONL messages -> prompt + ids
int RunChatParse(int argc, char** argv);   // cmd_chat.cc: JSONL completion -> message

}  // namespace expertmesh::cli
