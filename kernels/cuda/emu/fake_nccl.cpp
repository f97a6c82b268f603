// A stand-in for NCCL (libnccl.so) over loopback TCP, beside fake_driver.cpp, so that GPU
// workers' NCCL groups (kernels/src/nccl.rs through cudarc, the coordinator's unique-id relay,
// worker/src/links.rs) form and exchange rows in CI without GPUs (tests/gpu_worker_emulated.rs).
// Device buffers are host memory under the fake driver, so send/recv read and write them
// directly.
//
// - ncclGetUniqueId starts a bootstrap root on 127.0.0.1 (a thread of the calling process, as
//   NCCL's root is) and writes its port and a nonce into the id.
// - ncclCommInitRank registers the rank's own listening port with the root, receives every
//   rank's, and connects the full mesh (a rank connects to lower ranks, accepts higher ones).
// - ncclSend/ncclRecv inside ncclGroupStart/End are posted, then run at ncclGroupEnd: sends on
//   threads of their own (a length header, then the bytes), receives in order per peer; a
//   rank's sends to itself are matched with its receives from itself. A length that differs
//   from the posted receive is an error, as a mismatched NCCL exchange is.
// - ncclCommAbort shuts the sockets down, so a rank blocked in an exchange returns an error.
//
// Built by the tests with: g++ -std=c++20 -O1 -shared -fPIC -Wl,-soname,libnccl.so
//   kernels/cuda/emu/fake_nccl.cpp -o libnccl.so -lpthread

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

typedef int ncclResult_t;
enum : int { ncclSuccess = 0, ncclSystemError = 2, ncclInternalError = 3, ncclInvalidArgument = 4, ncclInvalidUsage = 5, ncclRemoteError = 6 };

struct ncclUniqueId {
    char internal[128];
};

struct Comm {
    int rank = 0, size = 0;
    std::vector<int> fds;  // to each peer; -1 for self
    std::atomic<bool> aborted{false};
};
typedef Comm* ncclComm_t;

static const uint32_t MAGIC = 0x434e4d45;  // "EMNC"

static bool write_all(int fd, const void* p, size_t n) {
    const char* c = (const char*)p;
    while (n) {
        ssize_t w = ::send(fd, c, n, MSG_NOSIGNAL);
        if (w <= 0) return false;
        c += w;
        n -= (size_t)w;
    }
    return true;
}

static bool read_all(int fd, void* p, size_t n) {
    char* c = (char*)p;
    while (n) {
        ssize_t r = ::recv(fd, c, n, 0);
        if (r <= 0) return false;
        c += r;
        n -= (size_t)r;
    }
    return true;
}

static int listen_any(uint16_t* port) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    socklen_t len = sizeof a;
    if (::bind(fd, (sockaddr*)&a, sizeof a) != 0 || ::listen(fd, 64) != 0 || ::getsockname(fd, (sockaddr*)&a, &len) != 0) {
        ::close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

static int connect_to(uint16_t port) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    if (::connect(fd, (sockaddr*)&a, sizeof a) != 0) {
        ::close(fd);
        return -1;
    }
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

struct Hello {
    uint32_t magic, size, rank;
    uint64_t nonce;
    uint16_t port;
};

// The bootstrap root: collects every rank's port, then sends each rank the table. Serves one
// group (one id), then exits.
static void root(int lfd, uint64_t nonce) {
    std::vector<int> conns;
    std::vector<uint16_t> ports;
    uint32_t size = 0, joined = 0;
    while (size == 0 || joined < size) {
        int c = ::accept(lfd, nullptr, nullptr);
        if (c < 0) break;
        Hello h{};
        if (!read_all(c, &h, sizeof h) || h.magic != MAGIC || h.nonce != nonce || h.size == 0 || h.rank >= h.size ||
            (size && h.size != size)) {
            ::close(c);
            continue;
        }
        if (!size) {
            size = h.size;
            conns.assign(size, -1);
            ports.assign(size, 0);
        }
        if (conns[h.rank] < 0) joined++;
        else ::close(conns[h.rank]);
        conns[h.rank] = c;
        ports[h.rank] = h.port;
    }
    for (int c : conns)
        if (c >= 0) {
            write_all(c, ports.data(), ports.size() * sizeof(uint16_t));
            ::close(c);
        }
    ::close(lfd);
}

static thread_local int group_depth = 0;
struct Op {
    bool send;
    void* buf;
    size_t bytes;
    int peer;
    Comm* comm;
};
static thread_local std::vector<Op> posted;

static ncclResult_t run_ops(std::vector<Op> ops) {
    ncclResult_t rc = ncclSuccess;
    std::vector<std::thread> senders;
    std::vector<Op> self_sends;
    std::atomic<int> send_failed{0};
    for (auto& o : ops) {
        if (!o.send) continue;
        if (o.peer == o.comm->rank) {
            self_sends.push_back(o);
            continue;
        }
        senders.emplace_back([o, &send_failed] {
            uint64_t n = o.bytes;
            if (!write_all(o.comm->fds[o.peer], &n, 8) || !write_all(o.comm->fds[o.peer], o.buf, o.bytes)) send_failed++;
        });
    }
    size_t next_self = 0;
    for (auto& o : ops) {
        if (o.send) continue;
        if (o.peer == o.comm->rank) {
            if (next_self >= self_sends.size() || self_sends[next_self].bytes != o.bytes) {
                rc = ncclInvalidUsage;
                continue;
            }
            std::memcpy(o.buf, self_sends[next_self++].buf, o.bytes);
            continue;
        }
        uint64_t n = 0;
        if (!read_all(o.comm->fds[o.peer], &n, 8)) {
            rc = ncclRemoteError;
            continue;
        }
        if (n != o.bytes) {
            std::fprintf(stderr, "fake NCCL: rank %d posted a %zu-byte receive from rank %d, which sent %llu\n",
                         o.comm->rank, o.bytes, o.peer, (unsigned long long)n);
            rc = ncclInvalidUsage;
            std::vector<char> sink(n);
            read_all(o.comm->fds[o.peer], sink.data(), n);
            continue;
        }
        if (!read_all(o.comm->fds[o.peer], o.buf, o.bytes)) rc = ncclRemoteError;
    }
    for (auto& t : senders) t.join();
    if (send_failed && rc == ncclSuccess) rc = ncclRemoteError;
    if (next_self != self_sends.size() && rc == ncclSuccess) rc = ncclInvalidUsage;
    return rc;
}

extern "C" {

ncclResult_t ncclGetVersion(int* v) { *v = 22800; return ncclSuccess; }

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    uint16_t port = 0;
    int lfd = listen_any(&port);
    if (lfd < 0) return ncclSystemError;
    uint64_t nonce = std::random_device{}() * 0x100000000ull + std::random_device{}();
    std::memset(id->internal, 0, sizeof id->internal);
    std::memcpy(id->internal, &MAGIC, 4);
    std::memcpy(id->internal + 4, &port, 2);
    std::memcpy(id->internal + 8, &nonce, 8);
    std::thread(root, lfd, nonce).detach();
    return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* out, int nranks, ncclUniqueId id, int rank) {
    uint32_t magic;
    uint16_t root_port;
    uint64_t nonce;
    std::memcpy(&magic, id.internal, 4);
    std::memcpy(&root_port, id.internal + 4, 2);
    std::memcpy(&nonce, id.internal + 8, 8);
    if (magic != MAGIC || nranks <= 0 || rank < 0 || rank >= nranks) return ncclInvalidArgument;
    uint16_t my_port = 0;
    int lfd = listen_any(&my_port);
    if (lfd < 0) return ncclSystemError;
    int r = connect_to(root_port);
    if (r < 0) {
        ::close(lfd);
        return ncclRemoteError;
    }
    Hello h{MAGIC, (uint32_t)nranks, (uint32_t)rank, nonce, my_port};
    std::vector<uint16_t> ports(nranks);
    bool ok = write_all(r, &h, sizeof h) && read_all(r, ports.data(), ports.size() * sizeof(uint16_t));
    ::close(r);
    if (!ok) {
        ::close(lfd);
        return ncclRemoteError;
    }
    auto* c = new Comm();
    c->rank = rank;
    c->size = nranks;
    c->fds.assign(nranks, -1);
    for (int p = 0; p < rank; p++) {
        int fd = connect_to(ports[p]);
        uint32_t me = (uint32_t)rank;
        if (fd < 0 || !write_all(fd, &me, 4)) ok = false;
        c->fds[p] = fd;
    }
    for (int i = rank + 1; ok && i < nranks; i++) {
        int fd = ::accept(lfd, nullptr, nullptr);
        uint32_t who = 0;
        if (fd < 0 || !read_all(fd, &who, 4) || who <= (uint32_t)rank || who >= (uint32_t)nranks) {
            ok = false;
            break;
        }
        int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fds[who] = fd;
    }
    ::close(lfd);
    if (!ok) {
        for (int fd : c->fds)
            if (fd >= 0) ::close(fd);
        delete c;
        return ncclRemoteError;
    }
    *out = c;
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t c) {
    if (!c) return ncclInvalidArgument;
    c->aborted = true;
    for (int fd : c->fds)
        if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t c) {
    if (!c) return ncclInvalidArgument;
    for (int fd : c->fds)
        if (fd >= 0) ::close(fd);
    delete c;
    return ncclSuccess;
}

ncclResult_t ncclCommCount(ncclComm_t c, int* n) { *n = c->size; return ncclSuccess; }
ncclResult_t ncclCommUserRank(ncclComm_t c, int* r) { *r = c->rank; return ncclSuccess; }
ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t* e) {
    *e = c->aborted ? ncclRemoteError : ncclSuccess;
    return ncclSuccess;
}

ncclResult_t ncclGroupStart() {
    group_depth++;
    return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
    if (group_depth == 0) return ncclInvalidUsage;
    if (--group_depth > 0) return ncclSuccess;
    std::vector<Op> ops;
    ops.swap(posted);
    return run_ops(std::move(ops));
}

static ncclResult_t post(bool send, const void* buf, size_t count, int dtype, int peer, ncclComm_t c) {
    if (!c || peer < 0 || peer >= c->size || (dtype != 0 /* ncclInt8 */ && dtype != 1 /* ncclUint8 */))
        return ncclInvalidArgument;
    if (c->aborted) return ncclRemoteError;
    Op o{send, (void*)buf, count, peer, c};
    if (group_depth > 0) {
        posted.push_back(o);
        return ncclSuccess;
    }
    return run_ops({o});
}

ncclResult_t ncclSend(const void* buf, size_t count, int dtype, int peer, ncclComm_t c, void*) {
    return post(true, buf, count, dtype, peer, c);
}

ncclResult_t ncclRecv(void* buf, size_t count, int dtype, int peer, ncclComm_t c, void*) {
    return post(false, buf, count, dtype, peer, c);
}

const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclRemoteError: return "fake NCCL: a peer went away or the communicator was aborted";
        case ncclInvalidUsage: return "fake NCCL: mismatched send and receive sizes";
        default: return "fake NCCL error";
    }
}

const char* ncclGetLastError(ncclComm_t) { return ""; }

}  // extern "C"
