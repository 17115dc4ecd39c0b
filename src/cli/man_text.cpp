// man_text.cpp: see man_text.hpp.
#include "cli/man_text.hpp"

#include <cctype>
#include <sstream>
#include <vector>

namespace pipecr::cli {

extern const char* const kManPageScd;  // generated: man_scd.cpp

std::string strip_scdoc(const std::string& line) {
  std::string out;
  for (size_t i = 0; i < line.size(); ++i) {
    char c = line[i];
    if (c == '\\' && i + 1 < line.size()) {  // an escaped character stands for itself
      out += line[++i];
      continue;
    }
    if (c == '*') continue;  // bold on/off
    // _x_ is underline; an underscore inside a word (CAP_SYS_RESOURCE, data_base64) is a letter.
    if (c == '_') {
      bool prev_word = i > 0 && (std::isalnum(static_cast<unsigned char>(line[i - 1])) != 0);
      bool next_word = i + 1 < line.size() && (std::isalnum(static_cast<unsigned char>(line[i + 1])) != 0);
      if (!(prev_word && next_word)) continue;
    }
    out += c;
  }
  return out;
}

std::string man_description(const std::string& cmd) {
  std::istringstream in(kManPageScd);
  std::string line, heading = "## " + cmd;
  bool in_section = false, past_synopsis = false;
  std::vector<std::string> lines;
  while (std::getline(in, line)) {
    if (!in_section) {
      in_section = line == heading;
      continue;
    }
    if (line.rfind("#", 0) == 0) break;  // the next section
    if (!past_synopsis) {                // the synopsis line, then a blank line
      past_synopsis = line.rfind("*pipecr ", 0) == 0;
      continue;
    }
    // The first option or argument definition ends the description: "*-t*, ...", "*--json*", "_PID_:_FD_".
    if (line.rfind("*-", 0) == 0 || line.rfind("_", 0) == 0) break;
    lines.push_back(strip_scdoc(line));
  }
  while (!lines.empty() && lines.back().empty()) lines.pop_back();
  while (!lines.empty() && lines.front().empty()) lines.erase(lines.begin());
  std::string out;
  for (const std::string& l : lines) out += l + "\n";
  return out;
}

}  // namespace pipecr::cli
