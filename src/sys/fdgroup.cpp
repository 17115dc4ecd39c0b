// fdgroup.cpp: grouping fds by open file description with a fallible kcmp merge sort.
//
// The merge sort works on runs of *groups*: each leaf is a group of one fd; when a merge finds two
// heads equal (kcmp 0) it joins them into one group instead of emitting both. So sorting and
// splitting into runs of equal happen in the same pass, with at most n*ceil(log2 n) comparisons and
// fewer when many fds share a description (measured in fdgroup_test: 2,000 distinct fds take about
// 19,000 kcmp calls; n^2/2 would be 2,000,000).
#include "sys/fdgroup.hpp"

#include <algorithm>
#include <numeric>

#include "sys/syscalls.hpp"

namespace pipecr::sys {
namespace {

using Group = std::vector<size_t>;  // indices into the input
using Run = std::vector<Group>;     // groups in kcmp order

class Grouper {
 public:
  Grouper(std::span<const FdRef> fds, const FileCompare& cmp) : fds_(fds), cmp_(cmp) {}

  // Sort idx[lo, hi) into a run of groups.
  Expected<Run> sort(std::span<const size_t> idx) {
    if (idx.size() == 1) return Run{Group{idx[0]}};
    size_t mid = idx.size() / 2;
    auto left = sort(idx.first(mid));
    if (!left) return left;
    auto right = sort(idx.subspan(mid));
    if (!right) return right;
    return merge(std::move(*left), std::move(*right));
  }

 private:
  Expected<int> compare(const Group& a, const Group& b) {
    const FdRef& x = fds_[a.front()];
    const FdRef& y = fds_[b.front()];
    if (x == y) return 0;  // the same fd slot: no need to ask the kernel
    return cmp_(x, y);
  }

  Expected<Run> merge(Run a, Run b) {
    Run out;
    out.reserve(a.size() + b.size());
    size_t i = 0, j = 0;
    while (i < a.size() && j < b.size()) {
      auto c = compare(a[i], b[j]);
      if (!c) return tl::unexpected(c.error());
      if (*c < 0) {
        out.push_back(std::move(a[i++]));
      } else if (*c > 0) {
        out.push_back(std::move(b[j++]));
      } else {  // one open file description: join the groups
        a[i].insert(a[i].end(), b[j].begin(), b[j].end());
        out.push_back(std::move(a[i++]));
        ++j;
      }
    }
    for (; i < a.size(); ++i) out.push_back(std::move(a[i]));
    for (; j < b.size(); ++j) out.push_back(std::move(b[j]));
    return out;
  }

  std::span<const FdRef> fds_;
  const FileCompare& cmp_;
};

}  // namespace

FileCompare kcmp_compare() {
  return [](const FdRef& a, const FdRef& b) { return kcmp_file(a.pid, a.fd, b.pid, b.fd); };
}

Expected<std::vector<FdGroup>> group_by_open_file(std::span<const FdRef> fds, const FileCompare& cmp) {
  // Bucket by inode first (no kernel calls): fds of different pipes never share a description.
  std::vector<size_t> order(fds.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return fds[a].ino < fds[b].ino; });

  Grouper grouper(fds, cmp);
  std::vector<Group> groups;
  for (size_t lo = 0; lo < order.size();) {
    size_t hi = lo + 1;
    while (hi < order.size() && fds[order[hi]].ino == fds[order[lo]].ino) ++hi;
    auto run = grouper.sort(std::span<const size_t>(order).subspan(lo, hi - lo));
    if (!run) return tl::unexpected(run.error());
    for (Group& g : *run) groups.push_back(std::move(g));
    lo = hi;
  }

  // Stable output: members in input order, groups by their first member.
  for (Group& g : groups) std::sort(g.begin(), g.end());
  std::sort(groups.begin(), groups.end(), [](const Group& a, const Group& b) { return a.front() < b.front(); });
  std::vector<FdGroup> out(groups.size());
  for (size_t k = 0; k < groups.size(); ++k) {
    out[k].members.reserve(groups[k].size());
    for (size_t i : groups[k]) out[k].members.push_back(fds[i]);
  }
  return out;
}

}  // namespace pipecr::sys
