// Plugin -> kernel mapping, checked on a CPU: each plugin's enqueue() and getWorkspaceSize() are
// run against a recording double of the kernel C ABI (kernel_abi_recorder.cpp), and the recorded
// ouroOutlierLinearParams_t / ouroSelectiveScanParams_t are compared field by field with what the
// ONNX contract says each input and attribute means. No GPU, no TensorRT runtime.
#include "OutlierLinearPlugin.h"
#include "SelectiveScanPlugin.h"
#include "check.h"
#include "kernel_abi_recorder.h"

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;
using namespace ouro::plugin;
using ouro_test::recorder;

namespace
{
using ouro_test::gChecks;
using ouro_test::gFailures;

constexpr int32_t kL = 197, kK = 384, kN = 1536, kD = 768, kS = 16, kBatch = 3;

//! Distinct fake device addresses: input i -> 0x1000 * (i + 1). Never dereferenced.
void const* fakeIn(int i)
{
    return reinterpret_cast<void const*>(static_cast<uintptr_t>(0x1000) * static_cast<uintptr_t>(i + 1));
}
void* const kOut = reinterpret_cast<void*>(static_cast<uintptr_t>(0xF0000));
void* const kWorkspace = reinterpret_cast<void*>(static_cast<uintptr_t>(0xE0000));
cudaStream_t const kStream = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(0xD0000));

PluginTensorDesc td(DataType t, std::vector<int64_t> dims)
{
    PluginTensorDesc d{};
    d.type = t;
    d.format = TensorFormat::kLINEAR;
    d.scale = -1.F;
    d.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t k = 0; k < dims.size(); ++k)
    {
        d.dims.d[k] = dims[k];
    }
    return d;
}

DynamicPluginTensorDesc dtd(PluginTensorDesc const& d, int64_t maxBatch)
{
    DynamicPluginTensorDesc x{};
    x.desc = d;
    x.min = x.opt = x.max = d.dims;
    if (d.dims.nbDims == 3)
    {
        x.max.d[0] = maxBatch;
    }
    return x;
}

std::vector<void const*> fakeInputs(int n)
{
    std::vector<void const*> v;
    for (int i = 0; i < n; ++i)
    {
        v.push_back(fakeIn(i));
    }
    return v;
}

// ---------------------------------------------------------------------------------------------
void outlierLinearCase(int32_t wBits, int32_t policy, DataType xType, int32_t maxOutliers = 32, int32_t stdCorrection = 0)
{
    int32_t const capacity = maxOutliers > 0 ? maxOutliers : kK; // 0 = no limit -> K
    OutlierLinearConfig c;
    c.in_features = kK;
    c.out_features = kN;
    c.seq_len = kL;
    c.w_bits = wBits;
    c.a_bits = 4;
    c.o_bits = 16;
    c.n_refresh = 10;
    c.threshold_policy = policy;
    c.k_sigma = 2.5F;
    c.max_outliers = maxOutliers;
    c.std_correction = stdCorrection;
    OutlierLinearPlugin p(c);

    std::vector<PluginTensorDesc> in = {td(xType, {kBatch, kL, kK}),
        td(DataType::kINT8, {kN, wBits == 8 ? kK : kK / 2}), td(DataType::kFLOAT, {kN}), td(DataType::kFLOAT, {kL}),
        td(DataType::kFLOAT, {kL}), td(DataType::kFLOAT, {kN})};
    PluginTensorDesc out = td(xType, {kBatch, kL, kN});
    std::vector<void const*> inputs = fakeInputs(6);
    void* outputs[1] = {kOut};

    recorder() = ouro_test::Recorder{};
    CHECK(p.enqueue(in.data(), &out, inputs.data(), outputs, kWorkspace, kStream) == 0);
    CHECK(recorder().linearCalls == 1);
    ouroOutlierLinearParams_t const& r = recorder().linear;
    CHECK(recorder().linearStream == kStream);
    CHECK(r.M == kBatch * kL && r.L == kL && r.K == kK && r.N == kN);
    CHECK(r.x == fakeIn(0));
    CHECK(r.x_is_fp32 == (xType == DataType::kFLOAT ? 1 : 0));
    CHECK(r.w == fakeIn(1));
    CHECK(r.w_bits == wBits);
    CHECK(r.w_scale == fakeIn(2));
    CHECK(r.act.scale == fakeIn(3));
    CHECK(r.act.theta == (policy == 1 ? fakeIn(4) : nullptr)); // theta only for calibrated thresholds
    CHECK(r.bias == fakeIn(5));
    CHECK(r.act.bits == 4 && r.act.bits_outlier == 16 && r.act.n_refresh == 10);
    CHECK(r.act.policy == policy && r.act.k_sigma == 2.5F);
    CHECK(r.act.std_correction == stdCorrection);
    CHECK(r.max_outliers == capacity);
    CHECK(r.y == kOut);
    CHECK(r.workspace == kWorkspace);
    // The workspace of the epilogue the kernels run (AUTO), not the separate epilogue's M x N buffers.
    CHECK(r.workspace_size
        == ouro_test::fakeOutlierLinearWorkspaceFor(kBatch * kL, kL, kK, kN, wBits, 4, 16, 10, capacity, OURO_EPILOGUE_AUTO));
    CHECK(r.acc_inlier == nullptr && r.acc_outlier == nullptr && r.inlier_codes == nullptr && r.outlier_mask == nullptr);
    ouroOutlierLinearConfig_t const& cfg = recorder().linearConfig;
    CHECK(cfg.path == OURO_PATH_NONE && cfg.epilogue == OURO_EPILOGUE_AUTO && cfg.tactic == 0);
    CHECK(cfg.overflow_report != nullptr && recorder().flagAllocs == 1); // allocated once, at the first enqueue

    // The workspace TensorRT reserves covers the profile's largest batch.
    std::vector<DynamicPluginTensorDesc> din;
    for (auto const& d : in)
    {
        din.push_back(dtd(d, 128));
    }
    DynamicPluginTensorDesc dout = dtd(out, 128);
    CHECK(p.getWorkspaceSize(din.data(), 6, &dout, 1)
        == ouro_test::fakeOutlierLinearWorkspaceFor(128 * kL, kL, kK, kN, wBits, 4, 16, 10, capacity, OURO_EPILOGUE_AUTO));

    // Tactics: the kernels' tile ids 1..n when the shape runs the fused epilogue; the chosen one reaches the kernel.
    CHECK(p.getNbTactics() == 7);
    std::vector<int32_t> tactics(7, -1);
    CHECK(p.getValidTactics(tactics.data(), 7) == 0);
    for (int32_t i = 0; i < 7; ++i)
    {
        CHECK(tactics[i] == i + 1);
    }
    CHECK(p.setTactic(8) != 0);
    CHECK(p.setTactic(5) == 0);
    CHECK(p.enqueue(in.data(), &out, inputs.data(), outputs, kWorkspace, kStream) == 0);
    CHECK(recorder().linearConfig.tactic == 5);
    std::unique_ptr<IPluginV3> cl(p.clone());
    CHECK(cl && static_cast<OutlierLinearPlugin*>(cl.get())->tactic() == 5); // clones keep the tactic
    recorder().planFused = false; // a shape the kernels run on the separate (SIMT) epilogue: no tactics
    CHECK(p.getNbTactics() == 0);
    recorder().planFused = true;

    // Capacity overflow: the kernels set the mapped flag asynchronously; the next enqueue reports it (and clears it).
    int32_t* flag = recorder().linearConfig.overflow_report;
    int const callsBefore = recorder().linearCalls;
    *flag = 1;
    CHECK(p.enqueue(in.data(), &out, inputs.data(), outputs, kWorkspace, kStream) != 0);
    CHECK(recorder().linearCalls == callsBefore); // nothing launched after an overflow was seen
    CHECK(*flag == 0);
    CHECK(p.enqueue(in.data(), &out, inputs.data(), outputs, kWorkspace, kStream) == 0);

    // A kernel error status is returned to TensorRT as a failure.
    recorder().status = OURO_ERR_OUTLIER_CAPACITY;
    CHECK(p.enqueue(in.data(), &out, inputs.data(), outputs, kWorkspace, kStream) != 0);
    recorder().status = OURO_OK;
}

// ---------------------------------------------------------------------------------------------
// emptyUnquantized: the tables of operands that are not quantized are [0] (what the exporter writes).
void selectiveScanCase(SelectiveScanConfig const& c, int nbInputs, DataType ioType, bool emptyUnquantized = false)
{
    SelectiveScanPlugin p(c);
    std::vector<PluginTensorDesc> in = {td(ioType, {kBatch, kL, kD}), td(ioType, {kBatch, kL, kD}),
        td(DataType::kFLOAT, {kD, kS}), td(ioType, {kBatch, kL, kS}), td(ioType, {kBatch, kL, kS}),
        td(DataType::kFLOAT, {kD}), td(ioType, {kBatch, kL, kD})};
    while (static_cast<int>(in.size()) < nbInputs)
    {
        int32_t const i = static_cast<int32_t>(in.size());
        bool const empty = i < 13 && emptyUnquantized && c.bitsOfTable(i) == 0;
        in.push_back(td(DataType::kFLOAT, {i < 13 ? (empty ? 0 : kL) : 20}));
    }
    PluginTensorDesc out = td(ioType, {kBatch, kL, kD});
    std::vector<void const*> inputs = fakeInputs(nbInputs);
    void* outputs[1] = {kOut};

    recorder() = ouro_test::Recorder{};
    CHECK(p.enqueue(in.data(), &out, inputs.data(), outputs, kWorkspace, kStream) == 0);
    CHECK(recorder().scanCalls == 1);
    ouroSelectiveScanParams_t const& r = recorder().scan;
    int const io32 = ioType == DataType::kFLOAT ? 1 : 0;
    CHECK(recorder().scanStream == kStream);
    CHECK(r.B == kBatch && r.L == kL && r.D == kD && r.S == kS);
    CHECK(r.io_is_fp32 == io32);
    CHECK(r.reverse == c.reverse && r.delta_softplus == c.delta_softplus);
    CHECK(r.u == fakeIn(0) && r.delta == fakeIn(1) && r.A == fakeIn(2) && r.Bm == fakeIn(3) && r.Cm == fakeIn(4));
    CHECK(r.Dskip == fakeIn(5) && r.z == fakeIn(6) && r.out == kOut);
    CHECK(r.workspace == kWorkspace && r.workspace_size == ouro_test::fakeSelectiveScanWorkspace(kBatch, kL, kD, kS, io32));

    struct Op
    {
        ouroActQuant_t const& q;
        int32_t bits, outlierBits;
        float kSigma;
        int scaleIdx;
    };
    Op const ops[] = {{r.delta_q, c.delta_bits, c.delta_bits_outlier, c.delta_k_sigma, 7},
        {r.b_q, c.b_bits, c.b_bits_outlier, c.bc_k_sigma, 9}, {r.c_q, c.c_bits, c.c_bits_outlier, c.bc_k_sigma, 11}};
    for (Op const& op : ops)
    {
        if (op.bits == 0)
        {
            CHECK(op.q.bits == 0 && op.q.scale == nullptr && op.q.theta == nullptr); // operand not quantized
            continue;
        }
        CHECK(op.q.bits == op.bits && op.q.bits_outlier == (op.outlierBits == 0 ? 16 : op.outlierBits));
        CHECK(op.q.n_refresh == c.n_refresh && op.q.policy == c.threshold_policy && op.q.k_sigma == op.kSigma);
        CHECK(op.q.std_correction == c.std_correction);
        CHECK(op.q.scale == fakeIn(op.scaleIdx));
        CHECK(op.q.theta == (c.threshold_policy == 1 ? fakeIn(op.scaleIdx + 1) : nullptr));
    }
    if (c.h_bits > 0)
    {
        CHECK(r.h_bits == c.h_bits && r.h_group == c.h_group && r.h_scale == fakeIn(13) && r.h_zero == fakeIn(14));
    }
    else
    {
        CHECK(r.h_bits == 0 && r.h_scale == nullptr && r.h_zero == nullptr);
    }

    std::vector<DynamicPluginTensorDesc> din;
    for (auto const& d : in)
    {
        din.push_back(dtd(d, 128));
    }
    DynamicPluginTensorDesc dout = dtd(out, 128);
    CHECK(p.getWorkspaceSize(din.data(), nbInputs, &dout, 1)
        == ouro_test::fakeSelectiveScanWorkspace(128, kL, kD, kS, io32));

    recorder().status = OURO_ERR_UNSUPPORTED_SHAPE;
    CHECK(p.enqueue(in.data(), &out, inputs.data(), outputs, kWorkspace, kStream) != 0);
}

SelectiveScanConfig quantScan(int32_t policy)
{
    SelectiveScanConfig c;
    c.reverse = 1;
    c.delta_softplus = 1;
    c.delta_bits = 8;
    c.delta_bits_outlier = 8;
    c.b_bits = 4;
    c.b_bits_outlier = 16;
    c.c_bits = 6;
    c.c_bits_outlier = 4;
    c.n_refresh = 10;
    c.threshold_policy = policy;
    c.delta_k_sigma = 3.F;
    c.bc_k_sigma = 2.F;
    c.h_bits = 8;
    c.h_group = 10;
    return c;
}
} // namespace

int main()
{
    for (int32_t wBits : {4, 8})
    {
        for (int32_t policy : {0, 1})
        {
            for (DataType t : {DataType::kHALF, DataType::kFLOAT})
            {
                outlierLinearCase(wBits, policy, t);
            }
        }
    }
    outlierLinearCase(4, 0, DataType::kHALF, 0);
    outlierLinearCase(8, 0, DataType::kHALF, 16, 1); // std_correction reaches the kernel
    SelectiveScanConfig fp;
    fp.reverse = 1;
    fp.delta_softplus = 1;
    for (DataType t : {DataType::kHALF, DataType::kFLOAT})
    {
        selectiveScanCase(fp, 7, t);
        selectiveScanCase(fp, 15, t); // a 15-input node with quantization off reads no table
        selectiveScanCase(quantScan(0), 15, t);
        selectiveScanCase(quantScan(1), 15, t);
    }
    SelectiveScanConfig bOnly = fp;
    bOnly.reverse = 0;
    bOnly.delta_softplus = 0;
    bOnly.b_bits = 4;
    bOnly.b_bits_outlier = 0; // fp16 outliers
    bOnly.n_refresh = 5;
    bOnly.bc_k_sigma = 1.5F;
    selectiveScanCase(bOnly, 15, DataType::kHALF);
    selectiveScanCase(bOnly, 15, DataType::kHALF, true); // partly quantized, [0] tables for delta and C
    SelectiveScanConfig corr = quantScan(0);
    corr.std_correction = 1;
    selectiveScanCase(corr, 15, DataType::kFLOAT);
    {
        // A quantized operand whose table has the wrong length at enqueue is an error, not a wrong result.
        SelectiveScanPlugin p(bOnly);
        std::vector<PluginTensorDesc> in = {td(DataType::kHALF, {kBatch, kL, kD}), td(DataType::kHALF, {kBatch, kL, kD}),
            td(DataType::kFLOAT, {kD, kS}), td(DataType::kHALF, {kBatch, kL, kS}), td(DataType::kHALF, {kBatch, kL, kS}),
            td(DataType::kFLOAT, {kD}), td(DataType::kHALF, {kBatch, kL, kD})};
        for (int i = 7; i < 15; ++i)
        {
            in.push_back(td(DataType::kFLOAT, {i == 9 ? 0 : kL})); // b_scale empty although b_bits = 4
        }
        PluginTensorDesc out = td(DataType::kHALF, {kBatch, kL, kD});
        std::vector<void const*> inputs = fakeInputs(15);
        void* outputs[1] = {kOut};
        recorder() = ouro_test::Recorder{};
        CHECK(p.enqueue(in.data(), &out, inputs.data(), outputs, kWorkspace, kStream) != 0);
        CHECK(recorder().scanCalls == 0);
    }

    std::printf("plugin -> kernel mapping: %d checks, %d failures\n", gChecks, gFailures);
    return gFailures == 0 ? 0 : 1;
}
