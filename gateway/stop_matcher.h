// Stop strings on streamed text: text that may still be the start of a stop string is held back
// until it can no longer match, so a client never sees part of a stop string, and the stop
// string itself is never emitted.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace expertmesh::gateway {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);
  // Adds the next text; returns what is now certain to precede any stop string. Once a stop
  // string is found, stopped() is true and everything from it on is dropped.
  std::string Feed(std::string_view text);
  // The end of the text: releases what was held back (nothing after a stop).
  std::string Flush();
  bool stopped() const { return stopped_; }
  // The stop string found (the earliest in the text); empty until stopped.
  const std::string& matched() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  std::string matched_;
  bool stopped_ = false;
};

}  // namespace expertmesh::gateway
