// SIGTERM/SIGINT handling without async-signal hazards: the signals are blocked in every thread
// (call BlockTerminationSignals first thing in main, before any thread starts, so that all
// threads inherit the mask) and the main thread takes them synchronously with sigwait.
#pragma once

namespace expertmesh::rpc {

// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and threads it creates later).
// SIGHUP ends a service like SIGTERM unless it asked for a reload instead
// (ServiceProcess::OnHangup; the gateway re-reads --api-keys-file).
void BlockTerminationSignals();
// Waits until one of them arrives; returns its number. Requires BlockTerminationSignals.
int WaitForTerminationSignal();
// Like WaitForTerminationSignal but gives up after `timeout_ms`; returns 0 then.
int WaitForTerminationSignalFor(int timeout_ms);

}  // namespace expertmesh::rpc
