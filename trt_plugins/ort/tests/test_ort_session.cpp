// C++ test of libouro_ort_ops.so inside a real onnxruntime session, without Python:
//
//   ouro_ort_tests <libouro_ort_ops.so> <group>      group: register | outlier_linear | selective_scan | errors
//
// One-node ONNX graphs are serialised in memory (a few protobuf fields), the library is registered with
// RegisterCustomOpsLibrary_V2, and the outputs are compared with a plain scalar reference written here from
// the specification (ouro.calib.quantizers.outlier_linear_ref, ouro.calib.scan.selective_scan_ref):
//   OutlierLinear  bit-exact (inputs are multiples of 1/8, so every mean is exact in any summation order)
//   SelectiveScan  within kScanTol of a double-precision recurrence
// Links libonnxruntime (the onnxruntime wheel's, or a release archive's).
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace
{

constexpr double kScanTol = 2e-5; // |native - double reference| <= kScanTol * (1 + |reference|)

const OrtApi* ort = nullptr;
OrtEnv* env = nullptr;
int failures = 0;

#define EXPECT(cond, ...)                                                                                              \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            std::fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond);                                    \
            std::fprintf(stderr, __VA_ARGS__);                                                                         \
            std::fprintf(stderr, "\n");                                                                                \
            ++failures;                                                                                                \
        }                                                                                                              \
    } while (0)

void ok(OrtStatus* st, const char* what)
{
    if (st)
    {
        std::fprintf(stderr, "onnxruntime error in %s: %s\n", what, ort->GetErrorMessage(st));
        ort->ReleaseStatus(st);
        std::exit(1);
    }
}

// ------------------------------------------------------------------------------------------ graph builder
struct Value
{
    std::string name;
    ONNXTensorElementDataType type;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes; // initializers only
};

template <typename T>
Value tensor(const std::string& name, ONNXTensorElementDataType type, std::vector<int64_t> shape, const std::vector<T>& v)
{
    Value x{name, type, std::move(shape), {}};
    x.bytes.resize(v.size() * sizeof(T));
    std::memcpy(x.bytes.data(), v.data(), x.bytes.size());
    return x;
}

struct Attr
{
    std::string name;
    bool is_float;
    double value;
};

// A minimal protobuf writer for the ONNX ModelProto of one node (field numbers from onnx.proto).
class Pb
{
public:
    Pb& varint(int field, uint64_t v) { key(field, 0); put_varint(v); return *this; }
    Pb& fixed32(int field, float f)
    {
        key(field, 5);
        uint32_t u;
        std::memcpy(&u, &f, 4);
        for (int i = 0; i < 4; ++i)
            buf.push_back(static_cast<uint8_t>(u >> (8 * i)));
        return *this;
    }
    Pb& bytes(int field, const void* p, size_t n)
    {
        key(field, 2);
        put_varint(n);
        buf.insert(buf.end(), static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + n);
        return *this;
    }
    Pb& str(int field, const std::string& s) { return bytes(field, s.data(), s.size()); }
    Pb& msg(int field, const Pb& m) { return bytes(field, m.buf.data(), m.buf.size()); }
    std::vector<uint8_t> buf;

private:
    void key(int field, int wire) { put_varint(static_cast<uint64_t>(field) << 3 | static_cast<uint64_t>(wire)); }
    void put_varint(uint64_t v)
    {
        do
        {
            uint8_t b = v & 0x7F;
            v >>= 7;
            buf.push_back(static_cast<uint8_t>(b | (v ? 0x80 : 0)));
        } while (v);
    }
};

// ValueInfoProto of a rank-3 tensor with symbolic dims d0, d1, d2 (shapes are checked by the op, not the graph).
Pb value_info(const std::string& name, ONNXTensorElementDataType type)
{
    Pb shape;
    for (const char* d : {"d0", "d1", "d2"})
        shape.msg(1, Pb().str(2, d));
    Pb tensor_type;
    tensor_type.varint(1, static_cast<uint64_t>(type)).msg(2, shape);
    return Pb().str(1, name).msg(2, Pb().msg(1, tensor_type));
}

// One ouro node: graph inputs `feeds`, constant `inits`, node inputs in `order`, one output `y` of `out_type`.
// Returns the session status (nullptr on success) and the session.
OrtStatus* make_session(const char* op, const std::vector<Value>& feeds, const std::vector<Value>& inits,
    const std::vector<std::string>& order, const std::vector<Attr>& attrs, ONNXTensorElementDataType out_type,
    const std::string& lib, OrtSession** session)
{
    Pb node;
    for (const std::string& in : order)
        node.str(1, in);
    node.str(2, "y").str(3, "node").str(4, op).str(7, "ouro");
    for (const Attr& a : attrs)
    {
        Pb at;
        at.str(1, a.name);
        if (a.is_float)
            at.fixed32(2, static_cast<float>(a.value)).varint(20, 1);
        else
            at.varint(3, static_cast<uint64_t>(static_cast<int64_t>(a.value))).varint(20, 2);
        node.msg(5, at);
    }
    Pb graph;
    graph.msg(1, node).str(2, "ouro_test");
    for (const Value& v : inits)
    {
        Pb t;
        for (int64_t d : v.shape)
            t.varint(1, static_cast<uint64_t>(d));
        t.varint(2, static_cast<uint64_t>(v.type)).str(8, v.name).bytes(9, v.bytes.data(), v.bytes.size());
        graph.msg(5, t);
    }
    for (const Value& f : feeds)
        graph.msg(11, value_info(f.name, f.type));
    graph.msg(12, value_info("y", out_type));
    Pb model;
    model.varint(1, 8).msg(8, Pb().str(1, "").varint(2, 17)).msg(8, Pb().str(1, "ouro").varint(2, 1)).msg(7, graph);
    OrtSessionOptions* so = nullptr;
    ok(ort->CreateSessionOptions(&so), "CreateSessionOptions");
    ok(ort->SetIntraOpNumThreads(so, 2), "SetIntraOpNumThreads");
    ok(ort->RegisterCustomOpsLibrary_V2(so, lib.c_str()), "RegisterCustomOpsLibrary_V2");
    OrtStatus* st = ort->CreateSessionFromArray(env, model.buf.data(), model.buf.size(), so, session);
    ort->ReleaseSessionOptions(so);
    return st;
}

// Runs the session on `feeds`; returns the status and fills `out` with the output bytes.
OrtStatus* run(OrtSession* s, const std::vector<Value>& feeds, std::vector<uint8_t>& out)
{
    OrtMemoryInfo* mem = nullptr;
    ok(ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mem), "CreateCpuMemoryInfo");
    std::vector<OrtValue*> in;
    std::vector<const char*> names;
    for (const Value& f : feeds)
    {
        OrtValue* v = nullptr;
        ok(ort->CreateTensorWithDataAsOrtValue(mem, const_cast<uint8_t*>(f.bytes.data()), f.bytes.size(), f.shape.data(),
               f.shape.size(), f.type, &v), "CreateTensorWithDataAsOrtValue");
        in.push_back(v);
        names.push_back(f.name.c_str());
    }
    const char* out_names[] = {"y"};
    OrtValue* y = nullptr;
    OrtStatus* st = ort->Run(s, nullptr, names.data(), in.data(), in.size(), out_names, 1, &y);
    if (!st)
    {
        OrtTensorTypeAndShapeInfo* info = nullptr;
        ok(ort->GetTensorTypeAndShape(y, &info), "GetTensorTypeAndShape");
        size_t n = 0;
        ok(ort->GetTensorShapeElementCount(info, &n), "GetTensorShapeElementCount");
        ONNXTensorElementDataType t{};
        ok(ort->GetTensorElementType(info, &t), "GetTensorElementType");
        ort->ReleaseTensorTypeAndShapeInfo(info);
        void* p = nullptr;
        ok(ort->GetTensorMutableData(y, &p), "GetTensorMutableData");
        out.assign(static_cast<uint8_t*>(p), static_cast<uint8_t*>(p) + n * (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? 2 : 4));
        ort->ReleaseValue(y);
    }
    for (OrtValue* v : in)
        ort->ReleaseValue(v);
    ort->ReleaseMemoryInfo(mem);
    return st;
}

std::string message(OrtStatus* st)
{
    std::string m = st ? ort->GetErrorMessage(st) : "";
    if (st)
        ort->ReleaseStatus(st);
    return m;
}

// ------------------------------------------------------------------------------------------ references
uint16_t to_half(float f) // exact round-half-even for the normal range used here
{
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax < 0x38800000u)
        return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(std::fabs(f) * 16777216.0f)));
    uint32_t h = ax - 0x38000000u;
    h += 0xFFFu + ((h >> 13) & 1u);
    return static_cast<uint16_t>(sign | (h >> 13));
}

float from_half(uint16_t h)
{
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0)
        return (sign ? -1.0f : 1.0f) * static_cast<float>(m) * 5.9604644775390625e-8f;
    const uint32_t bits = sign | ((e + 112u) << 23) | (m << 13);
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

struct LinearCase
{
    int B, L, K, N, w_bits, a_bits, o_bits, n_refresh, policy;
    float k_sigma;
};

// outlier_linear_ref, scalar, straight from the specification.
std::vector<float> linear_reference(const LinearCase& c, const std::vector<float>& x, const std::vector<int>& w,
    const std::vector<float>& ws, const std::vector<float>& si, const std::vector<float>& th, const std::vector<float>& bias)
{
    const float qi = static_cast<float>((1 << (c.a_bits - 1)) - 1);
    const float qo = c.o_bits >= 16 ? 0.0f : static_cast<float>((1 << (c.o_bits - 1)) - 1);
    std::vector<float> y(static_cast<size_t>(c.B) * c.L * c.N);
    for (int b = 0; b < c.B; ++b)
        for (int t0 = 0; t0 < c.L; t0 += c.n_refresh)
        {
            std::vector<bool> mask(c.K, false);
            for (int t = t0; t < std::min(c.L, t0 + c.n_refresh); ++t)
            {
                const float* xr = &x[(static_cast<size_t>(b) * c.L + t) * c.K];
                std::vector<float> a(c.K);
                float amax = 0;
                double sum = 0;
                for (int k = 0; k < c.K; ++k)
                {
                    a[k] = mask[k] ? 0.0f : std::fabs(xr[k]);
                    amax = std::max(amax, a[k]);
                    sum += a[k];
                }
                if (amax / qi > si[t])
                {
                    float theta = th[t];
                    if (c.policy == 0)
                    {
                        const double mean = sum / c.K;
                        double ss = 0;
                        for (int k = 0; k < c.K; ++k)
                            ss += (a[k] - mean) * (a[k] - mean);
                        theta = static_cast<float>(mean) + c.k_sigma * static_cast<float>(std::sqrt(ss / c.K));
                    }
                    for (int k = 0; k < c.K; ++k)
                        mask[k] = mask[k] || a[k] > theta;
                }
                float omax = 0;
                for (int k = 0; k < c.K; ++k)
                    if (mask[k])
                        omax = std::max(omax, std::fabs(xr[k]));
                const float so = c.o_bits >= 16 ? 1.0f : (omax > 0 ? omax / qo : 1.0f);
                for (int n = 0; n < c.N; ++n)
                {
                    int64_t acc_in = 0;
                    double acc_out = 0;
                    for (int k = 0; k < c.K; ++k)
                    {
                        const int wk = w[static_cast<size_t>(n) * c.K + k];
                        if (!mask[k])
                            acc_in += static_cast<int64_t>(std::clamp(std::nearbyint(xr[k] / si[t]), -qi, qi)) * wk;
                        else if (c.o_bits >= 16)
                            acc_out += static_cast<double>(from_half(to_half(xr[k]))) * wk;
                        else
                            acc_out += std::clamp(std::nearbyint(xr[k] / so), -qo, qo) * wk;
                    }
                    float v = static_cast<float>(acc_in) * (si[t] * ws[n]) + static_cast<float>(acc_out) * (so * ws[n]);
                    y[(static_cast<size_t>(b) * c.L + t) * c.N + n] = v + bias[n];
                }
            }
        }
    return y;
}

// Deterministic pseudo-random numbers (no <random> distribution differences across standard libraries).
struct Lcg
{
    uint64_t s;
    uint32_t next()
    {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return static_cast<uint32_t>(s >> 33);
    }
    int range(int lo, int hi) { return lo + static_cast<int>(next() % static_cast<uint32_t>(hi - lo + 1)); }
};

bool test_outlier_linear(const std::string& lib, bool fp16)
{
    const int before = failures;
    const LinearCase cases[] = {
        {2, 6, 16, 8, 8, 4, 8, 3, 0, 1.0f},
        {1, 5, 24, 5, 4, 4, 16, 5, 0, 0.5f},
        {3, 4, 32, 9, 4, 8, 4, 1, 1, 0.0f},
    };
    for (const LinearCase& c : cases)
    {
        Lcg r{static_cast<uint64_t>(c.K * 131 + c.N)};
        std::vector<float> x(static_cast<size_t>(c.B) * c.L * c.K);
        for (size_t i = 0; i < x.size(); ++i) // multiples of 1/8 in [-4, 4], a few channels x8 (outliers)
            x[i] = static_cast<float>(r.range(-32, 32)) / 8.0f * ((i % c.K) % 7 == 3 ? 8.0f : 1.0f);
        if (fp16)
            for (float& v : x)
                v = from_half(to_half(v));
        const int wmax = c.w_bits == 4 ? 7 : 127;
        std::vector<int> w(static_cast<size_t>(c.N) * c.K);
        for (int& v : w)
            v = r.range(-wmax - 1, wmax);
        std::vector<int8_t> wq;
        if (c.w_bits == 8)
            for (int v : w)
                wq.push_back(static_cast<int8_t>(v));
        else
            for (int n = 0; n < c.N; ++n)
                for (int k = 0; k < c.K; k += 2)
                    wq.push_back(static_cast<int8_t>((w[n * c.K + k] & 0xF) | ((w[n * c.K + k + 1] & 0xF) << 4)));
        std::vector<float> ws(c.N), si(c.L), th(c.L, 6.0f), bias(c.N);
        for (int n = 0; n < c.N; ++n)
        {
            ws[n] = 0.01f * static_cast<float>(r.range(1, 20));
            bias[n] = 0.125f * static_cast<float>(r.range(-8, 8));
        }
        for (int t = 0; t < c.L; ++t)
            si[t] = 0.25f * static_cast<float>(r.range(1, 4)) / static_cast<float>((1 << (c.a_bits - 1)) - 1) * 4.0f;
        const auto F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
        const auto act = fp16 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : F;
        Value xin;
        if (fp16)
        {
            std::vector<uint16_t> h;
            for (float v : x)
                h.push_back(to_half(v));
            xin = tensor("x", act, {c.B, c.L, c.K}, h);
        }
        else
            xin = tensor("x", act, {c.B, c.L, c.K}, x);
        const std::vector<Value> inits = {
            tensor("w", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, {c.N, c.w_bits == 8 ? c.K : c.K / 2}, wq),
            tensor("ws", F, {c.N}, ws), tensor("si", F, {c.L}, si), tensor("th", F, {c.L}, th), tensor("b", F, {c.N}, bias)};
        const std::vector<Attr> attrs = {{"in_features", false, double(c.K)}, {"out_features", false, double(c.N)},
            {"seq_len", false, double(c.L)}, {"w_bits", false, double(c.w_bits)}, {"a_bits", false, double(c.a_bits)},
            {"o_bits", false, double(c.o_bits)}, {"n_refresh", false, double(c.n_refresh)},
            {"threshold_policy", false, double(c.policy)}, {"k_sigma", true, c.k_sigma}, {"max_outliers", false, 0.0}};
        OrtSession* s = nullptr;
        const std::string err = message(make_session("OutlierLinear", {xin}, inits, {"x", "w", "ws", "si", "th", "b"}, attrs, act, lib, &s));
        EXPECT(err.empty(), "session creation failed: %s", err.c_str());
        if (!s)
            continue;
        std::vector<uint8_t> out;
        const std::string rerr = message(run(s, {xin}, out));
        EXPECT(rerr.empty(), "run failed: %s", rerr.c_str());
        const std::vector<float> ref = linear_reference(c, x, w, ws, si, th, bias);
        EXPECT(out.size() == ref.size() * (fp16 ? 2 : 4), "output has %zu bytes", out.size());
        int bad = 0;
        for (size_t i = 0; i < ref.size() && out.size() == ref.size() * (fp16 ? 2 : 4); ++i)
        {
            float got;
            float want = ref[i];
            if (fp16)
            {
                uint16_t h;
                std::memcpy(&h, &out[2 * i], 2);
                got = from_half(h);
                want = from_half(to_half(want));
            }
            else
                std::memcpy(&got, &out[4 * i], 4);
            bad += got != want;
        }
        EXPECT(bad == 0, "K=%d N=%d w%d a%d o%d: %d of %zu outputs differ from the reference", c.K, c.N, c.w_bits, c.a_bits,
            c.o_bits, bad, ref.size());
        ort->ReleaseSession(s);
    }
    return failures == before;
}

bool test_selective_scan(const std::string& lib)
{
    const int before = failures;
    const int B = 2, L = 9, D = 10, S = 3; // D = 10: one full block of 8 channels and a partial one
    Lcg r{7};
    auto uni = [&](float lo, float hi) { return lo + (hi - lo) * static_cast<float>(r.next() % 10000) / 10000.0f; };
    std::vector<float> u(B * L * D), delta(B * L * D), z(B * L * D), Bm(B * L * S), Cm(B * L * S), A(D * S), Dsk(D);
    for (auto* v : {&u, &z, &Bm, &Cm})
        for (float& e : *v)
            e = uni(-1.5f, 1.5f);
    for (float& e : delta)
        e = uni(-3.0f, 1.0f);
    for (float& e : A)
        e = -uni(0.2f, 3.0f);
    for (float& e : Dsk)
        e = uni(0.5f, 1.5f);
    for (int reverse : {0, 1})
    {
        const auto F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
        const std::vector<Value> feeds = {tensor("u", F, {B, L, D}, u), tensor("delta", F, {B, L, D}, delta),
            tensor("Bm", F, {B, L, S}, Bm), tensor("Cm", F, {B, L, S}, Cm), tensor("z", F, {B, L, D}, z)};
        const std::vector<Value> inits = {tensor("A", F, {D, S}, A), tensor("D", F, {D}, Dsk)};
        OrtSession* s = nullptr;
        const std::string err = message(make_session("SelectiveScan", feeds, inits, {"u", "delta", "A", "Bm", "Cm", "D", "z"},
            {{"reverse", false, double(reverse)}, {"delta_softplus", false, 1.0}}, F, lib, &s));
        EXPECT(err.empty(), "session creation failed: %s", err.c_str());
        if (!s)
            continue;
        std::vector<uint8_t> out;
        const std::string rerr = message(run(s, feeds, out));
        EXPECT(rerr.empty() && out.size() == u.size() * 4, "run failed: %s", rerr.c_str());
        double worst = 0;
        for (int b = 0; b < B && out.size() == u.size() * 4; ++b)
            for (int d = 0; d < D; ++d)
            {
                std::vector<double> h(S, 0.0);
                for (int i = 0; i < L; ++i)
                {
                    const int t = reverse ? L - 1 - i : i;
                    const size_t o = (static_cast<size_t>(b) * L + t) * D + d;
                    const double dt = std::log1p(std::exp(static_cast<double>(delta[o])));
                    double y = 0;
                    for (int k = 0; k < S; ++k)
                    {
                        h[k] = std::exp(dt * A[d * S + k]) * h[k] + dt * Bm[(b * L + t) * S + k] * u[o];
                        y += h[k] * Cm[(b * L + t) * S + k];
                    }
                    y = (y + u[o] * Dsk[d]) * (z[o] / (1.0 + std::exp(-static_cast<double>(z[o]))));
                    float got;
                    std::memcpy(&got, &out[4 * o], 4);
                    worst = std::max(worst, std::fabs(got - y) / (1.0 + std::fabs(y)));
                }
            }
        EXPECT(worst <= kScanTol, "reverse=%d: worst relative error %.3g > %.3g", reverse, worst, kScanTol);
        ort->ReleaseSession(s);
    }
    return failures == before;
}

bool test_errors(const std::string& lib)
{
    const int before = failures;
    const auto F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    const int L = 4, K = 8, N = 4;
    std::vector<float> ones(64, 1.0f);
    const std::vector<Value> inits = {tensor("w", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, {N, K}, std::vector<int8_t>(N * K, 1)),
        tensor("ws", F, {N}, std::vector<float>(N, 1.0f)), tensor("si", F, {L}, std::vector<float>(L, 1.0f)),
        tensor("th", F, {L}, std::vector<float>(L, 1.0f)), tensor("b", F, {N}, std::vector<float>(N, 0.0f))};
    const std::vector<std::string> order = {"x", "w", "ws", "si", "th", "b"};
    // a bad attribute fails at session creation, naming the node's op, the attribute and the allowed values
    OrtSession* s = nullptr;
    std::string err = message(make_session("OutlierLinear", {tensor("x", F, {1, L, K}, ones)}, inits, order,
        {{"w_bits", false, 3.0}}, F, lib, &s));
    EXPECT(err.find("OutlierLinear") != std::string::npos && err.find("'w_bits' = 3, expected one of {4, 8}") != std::string::npos,
        "message was: %s", err.c_str());
    if (s)
        ort->ReleaseSession(s);
    // a shape that contradicts the attributes fails at run time, naming the input and the dimension
    s = nullptr;
    err = message(make_session("OutlierLinear", {tensor("x", F, {1, L, K}, ones)}, inits, order,
        {{"in_features", false, 8.0}, {"seq_len", false, 4.0}}, F, lib, &s));
    EXPECT(err.empty(), "session creation failed: %s", err.c_str());
    if (s)
    {
        std::vector<uint8_t> out;
        std::vector<float> wide(1 * L * 6, 1.0f);
        err = message(run(s, {tensor("x", F, {1, L, 6}, wide)}, out));
        EXPECT(err.find("input 0 (x) dim 2 is 6, expected 8 (attribute in_features)") != std::string::npos, "message was: %s",
            err.c_str());
        ort->ReleaseSession(s);
    }
    return failures == before;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 3)
    {
        std::fprintf(stderr, "usage: ouro_ort_tests <libouro_ort_ops.so> register|outlier_linear|selective_scan|errors\n");
        return 2;
    }
    const std::string lib = argv[1], group = argv[2];
    ort = OrtGetApiBase()->GetApi(ORT_API_VERSION);
    if (!ort)
    {
        std::fprintf(stderr, "onnxruntime older than the headers (API %d)\n", ORT_API_VERSION);
        return 1;
    }
    ok(ort->CreateEnv(ORT_LOGGING_LEVEL_FATAL, "ouro_ort_tests", &env), "CreateEnv"); // errors are checked, not logged
    if (group == "register")
    {
        OrtSessionOptions* so = nullptr;
        ok(ort->CreateSessionOptions(&so), "CreateSessionOptions");
        const std::string err = message(ort->RegisterCustomOpsLibrary_V2(so, lib.c_str()));
        EXPECT(err.empty(), "RegisterCustomOpsLibrary_V2: %s", err.c_str());
        ort->ReleaseSessionOptions(so);
        test_outlier_linear(lib, false); // a session with an ouro node resolves the op
    }
    else if (group == "outlier_linear")
    {
        test_outlier_linear(lib, false);
        test_outlier_linear(lib, true);
    }
    else if (group == "selective_scan")
        test_selective_scan(lib);
    else if (group == "errors")
        test_errors(lib);
    else
    {
        std::fprintf(stderr, "unknown group %s\n", group.c_str());
        return 2;
    }
    ort->ReleaseEnv(env);
    if (failures)
        std::fprintf(stderr, "%d check(s) failed\n", failures);
    else
        std::printf("ouro_ort_tests %s: all checks passed\n", group.c_str());
    return failures ? 1 : 0;
}
