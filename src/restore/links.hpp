// restore/links.hpp: the links to a pipe that replacing its files cuts (epoll watches), named in
// notes. Refill in place (inplace.hpp) keeps them all; replacement cannot yet carry them over.
#pragma once

#include <string>
#include <vector>

namespace pipecr::restore {

struct Plan;

// One note per epoll watch, in a target, on an fd the plan replaces (reads /proc only).
[[nodiscard]] std::vector<std::string> cut_links_notes(const Plan& plan);

}  // namespace pipecr::restore
