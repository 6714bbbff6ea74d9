#include "nbd_io.h"

#include <cerrno>
#include <fstream>

namespace nbdsnap {
namespace {

bool starts_with(const std::string& s, std::string_view p) { return s.compare(0, p.size(), p) == 0; }

// The first identity ("name:hexkey" per line) of a PSK file.
std::string first_psk_identity(const std::string& file) {
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    auto colon = line.find(':');
    if (colon != std::string::npos && colon > 0) return line.substr(0, colon);
  }
  return "";
}

}  // namespace

std::string NbdEndpoint::display() const {
  if (!label.empty()) return label;
  auto q = uri.find('?');
  if (q == std::string::npos) return uri;
  // Keep the socket of a unix URI (it says where), drop the rest.
  std::string out = uri.substr(0, q);
  std::string query = uri.substr(q + 1);
  auto s = query.find("socket=");
  if (s != std::string::npos) {
    auto end = query.find('&', s);
    out += "?" + query.substr(s, end == std::string::npos ? std::string::npos : end - s);
  }
  return out;
}

std::string nbd_last_error() {
  const char* e = ::nbd_get_error();
  return e ? e : "unknown error";
}

int nbd_last_errno() {
  int e = ::nbd_get_errno();
  return e > 0 ? e : EIO;
}

void NbdConnection::Deleter::operator()(nbd_handle* h) const {
  if (h) ::nbd_close(h);
}

NbdConnection::~NbdConnection() = default;

Result<NbdConnection> NbdConnection::open(const NbdEndpoint& ep) {
  NbdConnection c;
  c.h_.reset(::nbd_create());
  if (!c.h_) return Status::error(ENOMEM, "connect to " + ep.display() + ": " + nbd_last_error());
  nbd_handle* h = c.get();
  auto fail = [&](const std::string& what) {
    return Status::error(nbd_last_errno(), "connect to " + ep.display() + ": " + what + nbd_last_error());
  };
  std::string uri = ep.uri;
  if (!ep.tls_psk_file.empty()) {
    // A key was given: TLS is required, whatever the scheme said.
    if (starts_with(uri, "nbd://")) uri = "nbds://" + uri.substr(6);
    if (starts_with(uri, "nbd+unix://")) uri = "nbds+unix://" + uri.substr(11);
    if (::nbd_set_tls(h, LIBNBD_TLS_REQUIRE) == -1 || ::nbd_set_tls_psk_file(h, ep.tls_psk_file.c_str()) == -1)
      return fail("TLS: ");
    std::string user = ep.tls_username.empty() ? first_psk_identity(ep.tls_psk_file) : ep.tls_username;
    if (user.empty())
      return Status::error(EINVAL, "connect to " + ep.display() + ": no identity (NAME:KEY line) in the PSK file " +
                                       ep.tls_psk_file);
    if (::nbd_set_tls_username(h, user.c_str()) == -1) return fail("TLS: ");
  }
  if (::nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1) return fail("");
  if (::nbd_connect_uri(h, uri.c_str()) == -1) return fail("");
  int64_t size = ::nbd_get_size(h);
  if (size < 0) return fail("size: ");
  c.size_ = static_cast<uint64_t>(size);
  c.multi_conn_ = ::nbd_can_multi_conn(h) == 1;
  c.read_only_ = ::nbd_is_read_only(h) == 1;
  c.can_zero_ = ::nbd_can_zero(h) == 1;
  c.can_flush_ = ::nbd_can_flush(h) == 1;
  c.allocation_ = ::nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  return c;
}

Result<std::vector<Extent>> NbdConnection::allocation(uint64_t offset, uint64_t length) {
  std::vector<Extent> out;
  auto add = [&out](uint64_t off, uint64_t len, bool zero) {
    if (len == 0) return;
    if (!out.empty() && out.back().zero == zero && out.back().offset + out.back().length == off)
      out.back().length += len;
    else
      out.push_back({off, len, zero});
  };
  if (!allocation_) {
    add(offset, length, false);
    return out;
  }
  uint64_t pos = offset, end = offset + length;
  while (pos < end) {
    struct Ctx {
      uint64_t pos;
      uint64_t end;
      std::vector<std::pair<uint64_t, bool>> runs;
    } ctx{pos, end, {}};
    nbd_extent_callback cb;
    cb.user_data = &ctx;
    cb.free = nullptr;
    cb.callback = [](void* ud, const char* meta, uint64_t, uint32_t* entries, size_t n, int*) -> int {
      auto* x = static_cast<Ctx*>(ud);
      if (std::string_view(meta) != LIBNBD_CONTEXT_BASE_ALLOCATION) return 0;
      for (size_t i = 0; i + 1 < n; i += 2) x->runs.emplace_back(entries[i], (entries[i + 1] & LIBNBD_STATE_ZERO) != 0);
      return 0;
    };
    uint64_t count = std::min<uint64_t>(end - pos, uint64_t{1} << 31);
    if (::nbd_block_status(get(), count, pos, cb, 0) == -1)
      return Status::error(nbd_last_errno(), "block status at " + std::to_string(pos) + ": " + nbd_last_error());
    if (ctx.runs.empty()) return Status::error(EPROTO, "block status at " + std::to_string(pos) + ": empty reply");
    for (auto [len, zero] : ctx.runs) {
      uint64_t l = std::min<uint64_t>(len, end - pos);
      add(pos, l, zero);
      pos += l;
      if (pos >= end) break;
    }
  }
  return out;
}

Status NbdConnection::flush() {
  if (!can_flush_) return Status::ok();
  if (::nbd_flush(get(), 0) == -1) return Status::error(nbd_last_errno(), "flush: " + nbd_last_error());
  return Status::ok();
}

Status NbdConnection::close() {
  if (!h_) return Status::ok();
  Status st = Status::ok();
  if (::nbd_shutdown(get(), 0) == -1) st = Status::error(nbd_last_errno(), "disconnect: " + nbd_last_error());
  h_.reset();
  return st;
}

}  // namespace nbdsnap
