// image_json.hpp: an Image as the JSON document of `pipecr show --json` (and `pipecr dump --json`,
// which prints the same document for the image it wrote). The document's fields, their types and
// meanings are specified in docs/json.md; this is their one implementation.
//
// The document mirrors the image's three identities (pipes, open files, fd slots) as flat arrays
// that refer to each other by id, like the image itself, so a consumer can join them (jq, Python)
// without the nesting of the human output. Numbers stay numbers; names come from describe.hpp.
// Keys keep the order in which they are written (ordered_json), the order docs/json.md lists them.
#pragma once

#include <cstddef>
#include <cstdio>
#include <span>
#include <string>

#include <nlohmann/json.hpp>

#include "pipecr/image.hpp"

namespace pipecr::cli {

struct ImageJsonOptions {
  // Add each pipe's queued bytes as "data_base64" (standard alphabet, padded). Needs
  // PipeRecord::data to hold the bytes (an image read by image::parse does).
  bool data = false;
};

[[nodiscard]] nlohmann::ordered_json image_to_json(const Image& img, const ImageJsonOptions& opt = {});

// The layout of the text, the same from both functions below: one top-level key per line, and in
// each top-level array one record per line, each record compact:
//   {
//     "format_version": 1,
//     "info": {"page_size":4096,...},
//     "pipes": [
//       {"id":1,"kind":"pipe",...},
//       {"id":2,"kind":"fifo",...}
//     ],
//     ...
//   }
// so that grep, diff and a person find one record per line, and a 100,000-pipe image stays a few
// tens of MB. Strings that are not valid UTF-8 (a comm, an argument or a path can be any bytes)
// have each invalid byte replaced by U+FFFD instead of failing the whole document.

// The whole document for img, streamed to out with a final newline: one record at a time is
// held in memory, never the document (an image of 100,000 pipes prints in bounded memory).
void write_image_json(std::FILE* out, const Image& img, const ImageJsonOptions& opt = {});

// A document built by image_to_json (or any JSON object) as text in that layout, without a final
// newline.
[[nodiscard]] std::string render_json(const nlohmann::ordered_json& doc);

// RFC 4648 base64 with padding.
[[nodiscard]] std::string base64(std::span<const std::byte> bytes);

}  // namespace pipecr::cli
