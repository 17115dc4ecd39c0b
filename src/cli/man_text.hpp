// man_text.hpp: the descriptions of pipecr(1), for --help.
//
// man/pipecr.1.scd is the one source of what each subcommand does: the build embeds it in the
// binary (cmake/man_scd.cpp.in), and main() shows a subcommand's description paragraphs from it
// at the end of `pipecr CMD --help`, with the scdoc markup taken out. Options keep their one-line
// CLI11 descriptions; tests/cli/man.bats checks that the page defines every one of them.
#pragma once

#include <string>

namespace pipecr::cli {

// The paragraphs of section "## cmd" of pipecr(1) between its synopsis and its first option,
// as plain text (no *bold*, _underline_ or escapes); empty when the page has no such section.
[[nodiscard]] std::string man_description(const std::string& cmd);

// The scdoc markup of one line taken out: *x* -> x, _x_ -> x, \+ -> +.
[[nodiscard]] std::string strip_scdoc(const std::string& line);

}  // namespace pipecr::cli
