// fdgroup.cpp: grouping fds by open file description with a fallible kcmp merge sort.
//
// The merge sort works on runs of *groups*: each leaf is a group of one fd; when a merge finds two
// heads equal (kcmp 0) it joins them into one group instead of emitting both. So sorting and
// splitting into runs of equal happen in the same pass, with at most n*ceil(log2 n) comparisons and
// fewer when many fds share a description (measured in fdgroup_test: 2,000 distinct fds take about
// 19,000 kcmp calls; n^2/2 would be 2,000,000). With an equality test (F_DUPFD_QUERY between
// pipecr's own copies), a small bucket is grouped by comparing each fd with one member of each
// group so far (a pipe's bucket holds one or two descriptions: one call per fd at most).
#include "sys/fdgroup.hpp"

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <numeric>

#include <fmt/format.h>

#include "sys/features.hpp"
#include "sys/syscalls.hpp"

#ifndef F_DUPFD_QUERY
#define F_DUPFD_QUERY (1024 + 3)  // F_LINUX_SPECIFIC_BASE + 3, Linux 6.10
#endif

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

// Beyond this many descriptions in one bucket, equality grouping (quadratic in the descriptions)
// gives way to the kcmp sort: at most 1 + 2 + ... + 8 = 36 equality calls are spent before it.
constexpr size_t kEqualGroups = 8;

// Groups idx by equality; false (nothing grouped) once the bucket shows more than kEqualGroups
// descriptions.
Expected<bool> group_equal(std::span<const FdRef> fds, std::span<const size_t> idx, const FileEqual& eq,
                           std::vector<Group>& out) {
  std::vector<Group> groups;
  for (size_t i : idx) {
    bool joined = false;
    for (Group& g : groups) {
      const FdRef& x = fds[g.front()];
      bool same = x == fds[i];
      if (!same) {
        auto r = eq(x, fds[i]);
        if (!r) return tl::unexpected(r.error());
        same = *r;
      }
      if (same) {
        g.push_back(i);
        joined = true;
        break;
      }
    }
    if (joined) continue;
    if (groups.size() == kEqualGroups) return false;
    groups.push_back(Group{i});
  }
  for (Group& g : groups) out.push_back(std::move(g));
  return true;
}

}  // namespace

Expected<bool> same_open_file(int fd1, int fd2) {
  int r = ::fcntl(fd1, F_DUPFD_QUERY, fd2);
  if (r < 0) return tl::unexpected(call_error("fcntl", fmt::format("fd={}, F_DUPFD_QUERY, {}", fd1, fd2)));
  return r == 1;
}

FileEqual own_file_equal() {
  if (!dupfd_query_works()) return {};
  return [self = ::getpid()](const FdRef& a, const FdRef& b) -> Expected<bool> {
    if (a.pid == self && b.pid == self) return same_open_file(a.fd, b.fd);
    auto c = kcmp_file(a.pid, a.fd, b.pid, b.fd);
    if (!c) return tl::unexpected(c.error());
    return *c == 0;
  };
}

size_t close_fds(std::vector<int>& fds) {
  static std::atomic<bool> have_close_range{true};  // until the kernel says ENOSYS
  std::sort(fds.begin(), fds.end());
  size_t calls = 0;
  for (size_t lo = 0; lo < fds.size();) {
    size_t hi = lo + 1;
    while (hi < fds.size() && fds[hi] == fds[hi - 1] + 1) ++hi;
    if (hi - lo > 1 && have_close_range) {
      ++calls;
      if (::syscall(SYS_close_range, static_cast<unsigned>(fds[lo]), static_cast<unsigned>(fds[hi - 1]), 0) == 0) {
        lo = hi;
        continue;
      }
      if (errno == ENOSYS) have_close_range = false;
    }
    for (; lo < hi; ++lo, ++calls) ::close(fds[lo]);
  }
  return calls;
}

FileCompare kcmp_compare() {
  return [](const FdRef& a, const FdRef& b) { return kcmp_file(a.pid, a.fd, b.pid, b.fd); };
}

Expected<std::vector<size_t>> open_file_ids(std::span<const FdRef> fds, const FileCompare& cmp, const FileEqual& eq) {
  // Bucket by inode first (no kernel calls): fds of different pipes never share a description.
  // Within an inode, by access mode where every member's is known (-1 sorts first).
  std::vector<size_t> order(fds.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return fds[a].ino != fds[b].ino ? fds[a].ino < fds[b].ino : fds[a].access < fds[b].access;
  });

  // rep[i]: the first fd (in input order) of i's group. A lone fd is its own and costs nothing
  // more: most buckets (a pipe's read end, its write end) hold one fd.
  std::vector<size_t> rep(fds.size());
  std::iota(rep.begin(), rep.end(), size_t{0});
  auto join = [&](const std::vector<Group>& groups) {
    for (const Group& g : groups) {
      const size_t first = *std::min_element(g.begin(), g.end());
      for (size_t i : g) rep[i] = first;
    }
  };
  Grouper grouper(fds, cmp);
  std::vector<Group> groups;
  auto bucket = [&](std::span<const size_t> idx) -> Expected<void> {
    if (idx.size() == 1) return {};  // nothing to compare
    groups.clear();
    if (eq) {
      auto done = group_equal(fds, idx, eq, groups);
      if (!done) return tl::unexpected(done.error());
      if (*done) {
        join(groups);
        return {};
      }
    }
    auto run = grouper.sort(idx);
    if (!run) return tl::unexpected(run.error());
    join(*run);
    return {};
  };
  for (size_t lo = 0; lo < order.size();) {
    size_t hi = lo + 1;
    while (hi < order.size() && fds[order[hi]].ino == fds[order[lo]].ino) ++hi;
    std::span<const size_t> same_ino = std::span<const size_t>(order).subspan(lo, hi - lo);
    if (fds[same_ino.front()].access < 0) {  // a mode unknown: every member may share with it
      if (auto r = bucket(same_ino); !r) return tl::unexpected(r.error());
    } else {
      for (size_t a = 0; a < same_ino.size();) {
        size_t b = a + 1;
        while (b < same_ino.size() && fds[same_ino[b]].access == fds[same_ino[a]].access) ++b;
        if (auto r = bucket(same_ino.subspan(a, b - a)); !r) return tl::unexpected(r.error());
        a = b;
      }
    }
    lo = hi;
  }

  // Numbered by first member: a group's first member comes before every other, so its id is known
  // by the time they are reached.
  std::vector<size_t> id(fds.size());
  size_t next = 0;
  for (size_t i = 0; i < fds.size(); ++i) id[i] = rep[i] == i ? next++ : id[rep[i]];
  return id;
}

Expected<std::vector<FdGroup>> group_by_open_file(std::span<const FdRef> fds, const FileCompare& cmp,
                                                  const FileEqual& eq) {
  auto id = open_file_ids(fds, cmp, eq);
  if (!id) return tl::unexpected(id.error());
  const size_t count = id->empty() ? 0 : *std::max_element(id->begin(), id->end()) + 1;
  std::vector<FdGroup> out(count);
  for (size_t i = 0; i < fds.size(); ++i) out[(*id)[i]].members.push_back(fds[i]);
  return out;
}

}  // namespace pipecr::sys
