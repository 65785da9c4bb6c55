// ouro_ort_run: runs an ouro ONNX graph (FP or plugin graph: ouro::OutlierLinear / ouro::SelectiveScan nodes)
// through onnxruntime's C API with libouro_ort_ops.so registered. No Python is involved.
//
//   ouro_ort_run <model.onnx> <libouro_ort_ops.so> <images.npy> [--labels labels.npy] [--threads N]
//                [--iters N] [--logits out.f32]
//
// images.npy: float32 or float16 array (N, C, H, W) in C order (numpy.save), the preprocessed images of the
// model's input dtype. Prints the top-1 class of every image (and the accuracy with --labels, an int64 or
// int32 array), then the mean latency of one run over all N images. --logits writes the raw float32 logits.
//
// 1. OrtGetApiBase()->GetApi(ORT_API_VERSION): the headers' API version, which the loaded onnxruntime must know;
// 2. SessionOptions: RegisterCustomOpsLibrary_V2(libouro_ort_ops.so), the intra-op threads, basic graph
//    optimisation (the level the project's Python sessions use);
// 3. CreateSession, one Run over the batch, argmax per row.
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace
{

const OrtApi* g_ort = nullptr;

void check(OrtStatus* st, const char* what)
{
    if (st)
    {
        std::fprintf(stderr, "ouro_ort_run: %s: %s\n", what, g_ort->GetErrorMessage(st));
        g_ort->ReleaseStatus(st);
        std::exit(1);
    }
}

[[noreturn]] void die(const std::string& msg)
{
    std::fprintf(stderr, "ouro_ort_run: %s\n", msg.c_str());
    std::exit(2);
}

// A .npy array (format 1.0/2.0/3.0, little-endian, C order): dtype string, shape and raw bytes.
struct Npy
{
    std::string descr;
    std::vector<int64_t> shape;
    std::vector<char> data;
};

Npy read_npy(const std::string& path)
{
    std::ifstream f(path, std::ios::binary);
    if (!f)
        die("cannot open " + path);
    char magic[8];
    f.read(magic, 8);
    if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0)
        die(path + " is not a .npy file");
    uint32_t hlen = 0;
    if (magic[6] == 1)
    {
        uint16_t h16 = 0;
        f.read(reinterpret_cast<char*>(&h16), 2);
        hlen = h16;
    }
    else
        f.read(reinterpret_cast<char*>(&hlen), 4);
    std::string header(hlen, '\0');
    f.read(header.data(), hlen);
    auto field = [&](const char* key) {
        const size_t k = header.find(key);
        if (k == std::string::npos)
            die(path + ": .npy header without " + key);
        return header.substr(header.find(':', k) + 1);
    };
    Npy a;
    const std::string d = field("'descr'");
    a.descr = d.substr(d.find('\'') + 1, d.find('\'', d.find('\'') + 1) - d.find('\'') - 1);
    const std::string fo = field("'fortran_order'");
    if (fo.compare(fo.find_first_not_of(' '), 4, "True") == 0)
        die(path + ": Fortran-order arrays are not supported");
    const std::string s = field("'shape'");
    const std::string dims = s.substr(s.find('(') + 1, s.find(')') - s.find('(') - 1);
    size_t n = 1;
    for (size_t p = 0; p < dims.size();)
    {
        const size_t q = dims.find(',', p);
        const std::string tok = dims.substr(p, q == std::string::npos ? std::string::npos : q - p);
        if (tok.find_first_of("0123456789") != std::string::npos)
        {
            a.shape.push_back(std::stoll(tok));
            n *= static_cast<size_t>(a.shape.back());
        }
        if (q == std::string::npos)
            break;
        p = q + 1;
    }
    const size_t item = a.descr == "<f4" || a.descr == "<i4" ? 4 : a.descr == "<f2" ? 2 : a.descr == "<i8" ? 8 : 0;
    if (!item)
        die(path + ": dtype " + a.descr + " not supported (float32, float16, int32, int64)");
    a.data.resize(n * item);
    f.read(a.data.data(), static_cast<std::streamsize>(a.data.size()));
    if (!f)
        die(path + ": truncated data");
    return a;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 4)
    {
        std::fprintf(stderr,
            "usage: ouro_ort_run <model.onnx> <libouro_ort_ops.so> <images.npy> [--labels labels.npy] [--threads N] "
            "[--iters N] [--logits out.f32]\n");
        return 2;
    }
    const std::string model = argv[1], lib = argv[2], images = argv[3];
    std::string labels_path, logits_path;
    int threads = 0, iters = 1;
    for (int i = 4; i + 1 < argc; i += 2)
    {
        const std::string k = argv[i];
        if (k == "--labels")
            labels_path = argv[i + 1];
        else if (k == "--threads")
            threads = std::atoi(argv[i + 1]);
        else if (k == "--iters")
            iters = std::max(1, std::atoi(argv[i + 1]));
        else if (k == "--logits")
            logits_path = argv[i + 1];
        else
            die("unknown option " + k);
    }

    g_ort = OrtGetApiBase()->GetApi(ORT_API_VERSION);
    if (!g_ort)
        die("the loaded onnxruntime is older than these headers (API " + std::to_string(ORT_API_VERSION) + ")");
    OrtEnv* env = nullptr;
    check(g_ort->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "ouro_ort_run", &env), "CreateEnv");
    OrtSessionOptions* so = nullptr;
    check(g_ort->CreateSessionOptions(&so), "CreateSessionOptions");
    check(g_ort->RegisterCustomOpsLibrary_V2(so, lib.c_str()), "RegisterCustomOpsLibrary_V2");
    if (threads > 0)
        check(g_ort->SetIntraOpNumThreads(so, threads), "SetIntraOpNumThreads");
    check(g_ort->SetSessionGraphOptimizationLevel(so, ORT_ENABLE_BASIC), "SetSessionGraphOptimizationLevel");
    OrtSession* session = nullptr;
    check(g_ort->CreateSession(env, model.c_str(), so, &session), "CreateSession");

    OrtAllocator* alloc = nullptr;
    check(g_ort->GetAllocatorWithDefaultOptions(&alloc), "GetAllocatorWithDefaultOptions");
    char* in_name = nullptr;
    char* out_name = nullptr;
    check(g_ort->SessionGetInputName(session, 0, alloc, &in_name), "SessionGetInputName");
    check(g_ort->SessionGetOutputName(session, 0, alloc, &out_name), "SessionGetOutputName");

    Npy x = read_npy(images);
    if (x.shape.size() != 4)
        die(images + ": expected an (N, C, H, W) array");
    const ONNXTensorElementDataType xt
        = x.descr == "<f2" ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (x.descr != "<f4" && x.descr != "<f2")
        die(images + ": images must be float32 or float16");
    OrtMemoryInfo* mem = nullptr;
    check(g_ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mem), "CreateCpuMemoryInfo");
    OrtValue* input = nullptr;
    check(g_ort->CreateTensorWithDataAsOrtValue(mem, x.data.data(), x.data.size(), x.shape.data(), x.shape.size(), xt, &input),
        "CreateTensorWithDataAsOrtValue");

    const char* in_names[] = {in_name};
    const char* out_names[] = {out_name};
    OrtValue* output = nullptr;
    double total_ms = 0;
    for (int it = 0; it < iters + (iters > 1 ? 1 : 0); ++it) // one warm-up run when timing several
    {
        if (output)
            g_ort->ReleaseValue(output);
        output = nullptr;
        const auto t0 = std::chrono::steady_clock::now();
        check(g_ort->Run(session, nullptr, in_names, &input, 1, out_names, 1, &output), "Run");
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        if (iters == 1 || it > 0)
            total_ms += ms;
    }

    OrtTensorTypeAndShapeInfo* info = nullptr;
    check(g_ort->GetTensorTypeAndShape(output, &info), "GetTensorTypeAndShape");
    size_t rank = 0;
    check(g_ort->GetDimensionsCount(info, &rank), "GetDimensionsCount");
    std::vector<int64_t> oshape(rank);
    check(g_ort->GetDimensions(info, oshape.data(), rank), "GetDimensions");
    ONNXTensorElementDataType ot{};
    check(g_ort->GetTensorElementType(info, &ot), "GetTensorElementType");
    g_ort->ReleaseTensorTypeAndShapeInfo(info);
    if (rank != 2 || ot != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        die("expected float32 logits of shape (N, classes)");
    float* logits = nullptr;
    check(g_ort->GetTensorMutableData(output, reinterpret_cast<void**>(&logits)), "GetTensorMutableData");
    const int64_t n = oshape[0], classes = oshape[1];

    std::vector<int64_t> labels;
    if (!labels_path.empty())
    {
        Npy l = read_npy(labels_path);
        for (int64_t i = 0; i < static_cast<int64_t>(l.data.size() / (l.descr == "<i8" ? 8 : 4)); ++i)
            labels.push_back(l.descr == "<i8" ? reinterpret_cast<const int64_t*>(l.data.data())[i]
                                              : reinterpret_cast<const int32_t*>(l.data.data())[i]);
        if (static_cast<int64_t>(labels.size()) != n)
            die(labels_path + ": " + std::to_string(labels.size()) + " labels for " + std::to_string(n) + " images");
    }
    int64_t correct = 0;
    for (int64_t i = 0; i < n; ++i)
    {
        const float* row = logits + i * classes;
        const int64_t top = std::max_element(row, row + classes) - row;
        if (labels.empty())
            std::printf("image %lld: top-1 %lld\n", static_cast<long long>(i), static_cast<long long>(top));
        else
        {
            correct += top == labels[i];
            std::printf("image %lld: top-1 %lld (label %lld)\n", static_cast<long long>(i), static_cast<long long>(top),
                static_cast<long long>(labels[i]));
        }
    }
    if (!labels.empty())
        std::printf("top-1 accuracy %lld/%lld\n", static_cast<long long>(correct), static_cast<long long>(n));
    std::printf("latency %.2f ms per run of %lld images (mean of %d)\n", total_ms / iters, static_cast<long long>(n), iters);
    if (!logits_path.empty())
    {
        std::ofstream f(logits_path, std::ios::binary);
        f.write(reinterpret_cast<const char*>(logits), static_cast<std::streamsize>(sizeof(float) * n * classes));
    }

    g_ort->ReleaseValue(output);
    g_ort->ReleaseValue(input);
    g_ort->ReleaseMemoryInfo(mem);
    alloc->Free(alloc, in_name);
    alloc->Free(alloc, out_name);
    g_ort->ReleaseSession(session);
    g_ort->ReleaseSessionOptions(so);
    g_ort->ReleaseEnv(env);
    return 0;
}
