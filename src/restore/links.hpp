// restore/links.hpp: the links to a pipe that replacing its files cuts (epoll watches), named in
// notes. Refill in place (inplace.hpp) keeps them all; replacement re-adds the epoll watches the
// image records (epoll.hpp), and the notes name the others.
#pragma once

#include <string>
#include <vector>

namespace pipecr::restore {

struct Plan;

// One note per epoll watch, in a target, on an fd the plan replaces and that the plan does not
// re-add (reads /proc only).
[[nodiscard]] std::vector<std::string> cut_links_notes(const Plan& plan);

}  // namespace pipecr::restore
