// Structured logging: one JSON object per line on stderr, with time, level, component and
// key/value fields, so that logs of a whole local cluster can be merged and filtered by machine.
#pragma once

#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

namespace expertmesh::base {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

struct LogField {
  LogField(std::string_view k, std::string_view v) : key(k), value(v), quoted(true) {}
  LogField(std::string_view k, const char* v) : key(k), value(v), quoted(true) {}
  LogField(std::string_view k, const std::string& v) : key(k), value(v), quoted(true) {}
  LogField(std::string_view k, bool v) : key(k), value(v ? "true" : "false"), quoted(false) {}
  template <typename T>
    requires std::is_arithmetic_v<T>
  LogField(std::string_view k, T v) : key(k), value(std::to_string(v)), quoted(false) {}
  std::string key;
  std::string value;
  bool quoted;
};

// Sets the component name printed on every line (e.g. "router"). Call once at start-up.
void SetLogComponent(std::string_view component);
// Lines below `level` are dropped. Thread-safe.
void SetLogLevel(LogLevel level);
// Parses "debug|info|warning|error"; returns false on anything else.
bool ParseLogLevel(std::string_view text, LogLevel* level);

// Writes one line. Thread-safe; a line is written with a single write(2).
void Log(LogLevel level, std::string_view message, std::initializer_list<LogField> fields = {});
// Formats a log line without writing it (exposed for tests).
std::string FormatLogLine(LogLevel level, std::string_view component, std::string_view message,
                          std::initializer_list<LogField> fields);

inline void LogInfo(std::string_view m, std::initializer_list<LogField> f = {}) {
  Log(LogLevel::kInfo, m, f);
}
inline void LogWarning(std::string_view m, std::initializer_list<LogField> f = {}) {
  Log(LogLevel::kWarning, m, f);
}
inline void LogError(std::string_view m, std::initializer_list<LogField> f = {}) {
  Log(LogLevel::kError, m, f);
}
inline void LogDebug(std::string_view m, std::initializer_list<LogField> f = {}) {
  Log(LogLevel::kDebug, m, f);
}

}  // namespace expertmesh::base
