// Status propagation helpers. Debian 12's Abseil (20220623) ships no status_macros.h, so the
// project provides the few it needs (STYLE.md, Errors).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define EM_CONCAT_INNER_(a, b) a##b
#define EM_CONCAT_(a, b) EM_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define EM_RETURN_IF_ERROR(expr)                 \
  do {                                           \
    ::absl::Status em_status_ = (expr);          \
    if (!em_status_.ok()) return em_status_;     \
  } while (0)

// `EM_ASSIGN_OR_RETURN(auto x, StatusOrExpr())`: declares/assigns x or returns the error.
#define EM_ASSIGN_OR_RETURN(lhs, expr) \
  EM_ASSIGN_OR_RETURN_IMPL_(EM_CONCAT_(em_statusor_, __LINE__), lhs, expr)
#define EM_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return std::move(tmp).status();  \
  lhs = std::move(tmp).value()

// Invariant check for programming errors only, never for untrusted input: aborts with location.
#define EM_CHECK(cond)                                                                    \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "EM_CHECK failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                       \
    }                                                                                     \
  } while (0)

namespace expertmesh::base {

// Prepends context to an error status, keeping its code ("loading shard 3: ...").
inline absl::Status Annotate(const absl::Status& status, std::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), std::string(context) + ": " + std::string(status.message()));
}

}  // namespace expertmesh::base
