// Serving a stream object as Server-Sent Events (shared by the OpenAI and Anthropic routes). S has next(sink),
// which httplib calls on a worker thread until it returns false or calls sink.done(), a Generation `g` and log().
#pragma once
#include <httplib.h>

#include <memory>

namespace trellm::server {

template <typename S>
void send_stream(httplib::Response& res, std::shared_ptr<S> st) {
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream", [st](size_t, httplib::DataSink& sink) { return st->next(sink); },
      [st](bool success) {
        if (!success) st->g->cancel();  // the client went away: the engine frees the sequences at its next step
        st->log();
      });
}

}  // namespace trellm::server
