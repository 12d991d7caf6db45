// Stop strings on a stream of generated text: a stop string may span token boundaries, and the text of a stop
// string is never emitted. Text is held back only while it could still be the start of a stop string.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace trellm::server {

class StopStrings {
 public:
  explicit StopStrings(std::vector<std::string> stops);
  // Appends `text`; returns what can be emitted now. After a match, stopped() is true and the text before the
  // stop string (including what was held back) has been returned; later calls return nothing.
  std::string feed(std::string_view text);
  // End of the stream: what is still held back.
  std::string finish();
  bool stopped() const { return stopped_; }
  const std::string& matched() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
  std::string matched_;
};

}  // namespace trellm::server
