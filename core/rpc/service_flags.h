// FlagSet moved to core/base/flags.h so that tools outside the RPC layer (the CLI, tests) parse
// flags without linking gRPC. These aliases keep the rpc:: spelling working for code that other
// changes still have open (service_process, worker_capacity, the attention worker's main).
#pragma once

#include "core/base/flags.h"

namespace expertmesh::rpc {

using base::FlagSet;
using base::ParseConfigText;

}  // namespace expertmesh::rpc
