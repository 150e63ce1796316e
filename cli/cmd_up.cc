// Placeholder until this subcommand lands; it refuses rather than fakes a result.
#include <cstdio>

#include "cli/commands.h"

namespace expertmesh::cli {

int RunUp(int, char**) {
  std::fprintf(stderr, "expertmesh: this command is not implemented yet\n");
  return 3;
}

}  // namespace expertmesh::cli
