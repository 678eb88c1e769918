from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_FORMAT_UNSPECIFIED: _ClassVar[ModelFormat]
    MODEL_FORMAT_TORCH_EXPORT: _ClassVar[ModelFormat]
    MODEL_FORMAT_SAFETENSORS: _ClassVar[ModelFormat]
    MODEL_FORMAT_PLUGIN: _ClassVar[ModelFormat]
    MODEL_FORMAT_HUGGING_FACE: _ClassVar[ModelFormat]

class Curvature(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CURVATURE_UNSPECIFIED: _ClassVar[Curvature]
    CURVATURE_HESSIAN: _ClassVar[Curvature]
    CURVATURE_GGN: _ClassVar[Curvature]
    CURVATURE_FISHER: _ClassVar[Curvature]
    CURVATURE_EMPIRICAL_FISHER: _ClassVar[Curvature]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FLOAT32: _ClassVar[Precision]
    PRECISION_FLOAT64: _ClassVar[Precision]

class TraceMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRACE_METHOD_UNSPECIFIED: _ClassVar[TraceMethod]
    TRACE_METHOD_HUTCHINSON: _ClassVar[TraceMethod]
    TRACE_METHOD_HUTCH_PLUS_PLUS: _ClassVar[TraceMethod]
    TRACE_METHOD_XTRACE: _ClassVar[TraceMethod]

class NonUniformityMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NON_UNIFORMITY_METHOD_UNSPECIFIED: _ClassVar[NonUniformityMethod]
    NON_UNIFORMITY_METHOD_EXACT: _ClassVar[NonUniformityMethod]
    NON_UNIFORMITY_METHOD_GAUSS_NEWTON: _ClassVar[NonUniformityMethod]

class LipschitzMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIPSCHITZ_METHOD_UNSPECIFIED: _ClassVar[LipschitzMethod]
    LIPSCHITZ_METHOD_NAIVE: _ClassVar[LipschitzMethod]
    LIPSCHITZ_METHOD_ECLIPSE_FAST: _ClassVar[LipschitzMethod]
    LIPSCHITZ_METHOD_LIPSDP_NEURON: _ClassVar[LipschitzMethod]
    LIPSCHITZ_METHOD_LIPSDP_LAYER: _ClassVar[LipschitzMethod]
    LIPSCHITZ_METHOD_LOWER: _ClassVar[LipschitzMethod]

class SdpSolver(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SDP_SOLVER_UNSPECIFIED: _ClassVar[SdpSolver]
    SDP_SOLVER_CVXOPT: _ClassVar[SdpSolver]
    SDP_SOLVER_SCS: _ClassVar[SdpSolver]

class SharpnessNorm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARPNESS_NORM_UNSPECIFIED: _ClassVar[SharpnessNorm]
    SHARPNESS_NORM_LINF: _ClassVar[SharpnessNorm]
    SHARPNESS_NORM_L2: _ClassVar[SharpnessNorm]
MODEL_FORMAT_UNSPECIFIED: ModelFormat
MODEL_FORMAT_TORCH_EXPORT: ModelFormat
MODEL_FORMAT_SAFETENSORS: ModelFormat
MODEL_FORMAT_PLUGIN: ModelFormat
MODEL_FORMAT_HUGGING_FACE: ModelFormat
CURVATURE_UNSPECIFIED: Curvature
CURVATURE_HESSIAN: Curvature
CURVATURE_GGN: Curvature
CURVATURE_FISHER: Curvature
CURVATURE_EMPIRICAL_FISHER: Curvature
PRECISION_UNSPECIFIED: Precision
PRECISION_FLOAT32: Precision
PRECISION_FLOAT64: Precision
TRACE_METHOD_UNSPECIFIED: TraceMethod
TRACE_METHOD_HUTCHINSON: TraceMethod
TRACE_METHOD_HUTCH_PLUS_PLUS: TraceMethod
TRACE_METHOD_XTRACE: TraceMethod
NON_UNIFORMITY_METHOD_UNSPECIFIED: NonUniformityMethod
NON_UNIFORMITY_METHOD_EXACT: NonUniformityMethod
NON_UNIFORMITY_METHOD_GAUSS_NEWTON: NonUniformityMethod
LIPSCHITZ_METHOD_UNSPECIFIED: LipschitzMethod
LIPSCHITZ_METHOD_NAIVE: LipschitzMethod
LIPSCHITZ_METHOD_ECLIPSE_FAST: LipschitzMethod
LIPSCHITZ_METHOD_LIPSDP_NEURON: LipschitzMethod
LIPSCHITZ_METHOD_LIPSDP_LAYER: LipschitzMethod
LIPSCHITZ_METHOD_LOWER: LipschitzMethod
SDP_SOLVER_UNSPECIFIED: SdpSolver
SDP_SOLVER_CVXOPT: SdpSolver
SDP_SOLVER_SCS: SdpSolver
SHARPNESS_NORM_UNSPECIFIED: SharpnessNorm
SHARPNESS_NORM_LINF: SharpnessNorm
SHARPNESS_NORM_L2: SharpnessNorm

class UploadChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("sha256", "size_bytes", "filename")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    filename: str
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., filename: _Optional[str] = ...) -> None: ...

class BlobRef(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class BlobInfo(_message.Message):
    __slots__ = ("sha256", "size_bytes")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("blob", "uri", "folder", "format", "architecture", "architecture_config_json")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    blob: BlobRef
    uri: str
    folder: FolderManifest
    format: ModelFormat
    architecture: str
    architecture_config_json: str
    def __init__(self, blob: _Optional[_Union[BlobRef, _Mapping]] = ..., uri: _Optional[str] = ..., folder: _Optional[_Union[FolderManifest, _Mapping]] = ..., format: _Optional[_Union[ModelFormat, str]] = ..., architecture: _Optional[str] = ..., architecture_config_json: _Optional[str] = ...) -> None: ...

class FolderManifest(_message.Message):
    __slots__ = ("files",)
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: BlobRef
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[BlobRef, _Mapping]] = ...) -> None: ...
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.MessageMap[str, BlobRef]
    def __init__(self, files: _Optional[_Mapping[str, BlobRef]] = ...) -> None: ...

class DataRef(_message.Message):
    __slots__ = ("blob", "uri")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    blob: BlobRef
    uri: str
    def __init__(self, blob: _Optional[_Union[BlobRef, _Mapping]] = ..., uri: _Optional[str] = ...) -> None: ...

class ParameterInfo(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ParameterBlock(_message.Message):
    __slots__ = ("name", "num_parameters", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_parameters: int
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterInfo]
    def __init__(self, name: _Optional[str] = ..., num_parameters: _Optional[int] = ..., parameters: _Optional[_Iterable[_Union[ParameterInfo, _Mapping]]] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ...) -> None: ...

class LipschitzChain(_message.Message):
    __slots__ = ("found", "reason")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    found: bool
    reason: str
    def __init__(self, found: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("sha256", "format", "architecture", "num_parameters", "blocks", "layers", "input_shape", "fixed_batch_size", "lipschitz_chain")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    FIXED_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LIPSCHITZ_CHAIN_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    format: str
    architecture: str
    num_parameters: int
    blocks: _containers.RepeatedCompositeFieldContainer[ParameterBlock]
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    fixed_batch_size: int
    lipschitz_chain: LipschitzChain
    def __init__(self, sha256: _Optional[str] = ..., format: _Optional[str] = ..., architecture: _Optional[str] = ..., num_parameters: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[ParameterBlock, _Mapping]]] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., input_shape: _Optional[_Iterable[int]] = ..., fixed_batch_size: _Optional[int] = ..., lipschitz_chain: _Optional[_Union[LipschitzChain, _Mapping]] = ...) -> None: ...

class AnalysisOptions(_message.Message):
    __slots__ = ("curvature", "precision", "seed", "micro_batch_size", "per_layer", "max_samples", "task", "memory_budget_bytes")
    CURVATURE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    curvature: Curvature
    precision: Precision
    seed: int
    micro_batch_size: int
    per_layer: bool
    max_samples: int
    task: str
    memory_budget_bytes: int
    def __init__(self, curvature: _Optional[_Union[Curvature, str]] = ..., precision: _Optional[_Union[Precision, str]] = ..., seed: _Optional[int] = ..., micro_batch_size: _Optional[int] = ..., per_layer: _Optional[bool] = ..., max_samples: _Optional[int] = ..., task: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ...) -> None: ...

class HessianEigenSpec(_message.Message):
    __slots__ = ("top_k", "bottom_k", "tolerance", "max_hvps")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_K_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_HVPS_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    bottom_k: int
    tolerance: float
    max_hvps: int
    def __init__(self, top_k: _Optional[int] = ..., bottom_k: _Optional[int] = ..., tolerance: _Optional[float] = ..., max_hvps: _Optional[int] = ...) -> None: ...

class HessianTraceSpec(_message.Message):
    __slots__ = ("method", "max_hvps", "relative_tolerance", "frobenius")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MAX_HVPS_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    FROBENIUS_FIELD_NUMBER: _ClassVar[int]
    method: TraceMethod
    max_hvps: int
    relative_tolerance: float
    frobenius: bool
    def __init__(self, method: _Optional[_Union[TraceMethod, str]] = ..., max_hvps: _Optional[int] = ..., relative_tolerance: _Optional[float] = ..., frobenius: _Optional[bool] = ...) -> None: ...

class HessianDensitySpec(_message.Message):
    __slots__ = ("lanczos_steps", "num_probes", "grid_points", "sigma", "negative_tolerance")
    LANCZOS_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROBES_FIELD_NUMBER: _ClassVar[int]
    GRID_POINTS_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    lanczos_steps: int
    num_probes: int
    grid_points: int
    sigma: float
    negative_tolerance: float
    def __init__(self, lanczos_steps: _Optional[int] = ..., num_probes: _Optional[int] = ..., grid_points: _Optional[int] = ..., sigma: _Optional[float] = ..., negative_tolerance: _Optional[float] = ...) -> None: ...

class SharpnessSpec(_message.Message):
    __slots__ = ("learning_rate",)
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    def __init__(self, learning_rate: _Optional[float] = ...) -> None: ...

class NonUniformitySpec(_message.Message):
    __slots__ = ("learning_rate", "batch_size", "max_samples", "tolerance", "method")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    batch_size: int
    max_samples: int
    tolerance: float
    method: NonUniformityMethod
    def __init__(self, learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., max_samples: _Optional[int] = ..., tolerance: _Optional[float] = ..., method: _Optional[_Union[NonUniformityMethod, str]] = ...) -> None: ...

class LipschitzSpec(_message.Message):
    __slots__ = ("methods", "solver", "split_size", "time_limit_seconds", "ascent_steps", "memory_limit_mib")
    METHODS_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    SPLIT_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ASCENT_STEPS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_MIB_FIELD_NUMBER: _ClassVar[int]
    methods: _containers.RepeatedScalarFieldContainer[LipschitzMethod]
    solver: SdpSolver
    split_size: int
    time_limit_seconds: float
    ascent_steps: int
    memory_limit_mib: int
    def __init__(self, methods: _Optional[_Iterable[_Union[LipschitzMethod, str]]] = ..., solver: _Optional[_Union[SdpSolver, str]] = ..., split_size: _Optional[int] = ..., time_limit_seconds: _Optional[float] = ..., ascent_steps: _Optional[int] = ..., memory_limit_mib: _Optional[int] = ...) -> None: ...

class EpsilonSharpnessSpec(_message.Message):
    __slots__ = ("epsilon", "subspace_dim", "max_iterations", "random_starts")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    SUBSPACE_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_STARTS_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    subspace_dim: int
    max_iterations: int
    random_starts: int
    def __init__(self, epsilon: _Optional[float] = ..., subspace_dim: _Optional[int] = ..., max_iterations: _Optional[int] = ..., random_starts: _Optional[int] = ...) -> None: ...

class AdaptiveSharpnessSpec(_message.Message):
    __slots__ = ("rho", "steps", "norm", "adaptive", "average_case", "random_starts")
    RHO_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_CASE_FIELD_NUMBER: _ClassVar[int]
    RANDOM_STARTS_FIELD_NUMBER: _ClassVar[int]
    rho: float
    steps: int
    norm: SharpnessNorm
    adaptive: bool
    average_case: bool
    random_starts: int
    def __init__(self, rho: _Optional[float] = ..., steps: _Optional[int] = ..., norm: _Optional[_Union[SharpnessNorm, str]] = ..., adaptive: _Optional[bool] = ..., average_case: _Optional[bool] = ..., random_starts: _Optional[int] = ...) -> None: ...

class WeightSpectraSpec(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AnalysisSpec(_message.Message):
    __slots__ = ("hessian_eigen", "hessian_trace", "hessian_density", "sharpness", "non_uniformity", "lipschitz", "epsilon_sharpness", "adaptive_sharpness", "weight_spectra")
    HESSIAN_EIGEN_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_TRACE_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_DENSITY_FIELD_NUMBER: _ClassVar[int]
    SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    NON_UNIFORMITY_FIELD_NUMBER: _ClassVar[int]
    LIPSCHITZ_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SPECTRA_FIELD_NUMBER: _ClassVar[int]
    hessian_eigen: HessianEigenSpec
    hessian_trace: HessianTraceSpec
    hessian_density: HessianDensitySpec
    sharpness: SharpnessSpec
    non_uniformity: NonUniformitySpec
    lipschitz: LipschitzSpec
    epsilon_sharpness: EpsilonSharpnessSpec
    adaptive_sharpness: AdaptiveSharpnessSpec
    weight_spectra: WeightSpectraSpec
    def __init__(self, hessian_eigen: _Optional[_Union[HessianEigenSpec, _Mapping]] = ..., hessian_trace: _Optional[_Union[HessianTraceSpec, _Mapping]] = ..., hessian_density: _Optional[_Union[HessianDensitySpec, _Mapping]] = ..., sharpness: _Optional[_Union[SharpnessSpec, _Mapping]] = ..., non_uniformity: _Optional[_Union[NonUniformitySpec, _Mapping]] = ..., lipschitz: _Optional[_Union[LipschitzSpec, _Mapping]] = ..., epsilon_sharpness: _Optional[_Union[EpsilonSharpnessSpec, _Mapping]] = ..., adaptive_sharpness: _Optional[_Union[AdaptiveSharpnessSpec, _Mapping]] = ..., weight_spectra: _Optional[_Union[WeightSpectraSpec, _Mapping]] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("model", "data", "loss", "options", "analyses")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ANALYSES_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    data: DataRef
    loss: str
    options: AnalysisOptions
    analyses: _containers.RepeatedCompositeFieldContainer[AnalysisSpec]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., data: _Optional[_Union[DataRef, _Mapping]] = ..., loss: _Optional[str] = ..., options: _Optional[_Union[AnalysisOptions, _Mapping]] = ..., analyses: _Optional[_Iterable[_Union[AnalysisSpec, _Mapping]]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("analysis", "step", "total", "current_estimate", "block", "stage")
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    analysis: str
    step: int
    total: int
    current_estimate: float
    block: str
    stage: str
    def __init__(self, analysis: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., current_estimate: _Optional[float] = ..., block: _Optional[str] = ..., stage: _Optional[str] = ...) -> None: ...

class AnalyzeEvent(_message.Message):
    __slots__ = ("queued", "progress", "report")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    queued: Queued
    progress: Progress
    report: Report
    def __init__(self, queued: _Optional[_Union[Queued, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., report: _Optional[_Union[Report, _Mapping]] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("sha256", "format", "num_parameters")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    format: str
    num_parameters: int
    def __init__(self, sha256: _Optional[str] = ..., format: _Optional[str] = ..., num_parameters: _Optional[int] = ...) -> None: ...

class DataSummary(_message.Message):
    __slots__ = ("sha256", "num_samples")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    num_samples: int
    def __init__(self, sha256: _Optional[str] = ..., num_samples: _Optional[int] = ...) -> None: ...

class LossSummary(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class EigenResiduals(_message.Message):
    __slots__ = ("largest", "smallest")
    LARGEST_FIELD_NUMBER: _ClassVar[int]
    SMALLEST_FIELD_NUMBER: _ClassVar[int]
    largest: _containers.RepeatedScalarFieldContainer[float]
    smallest: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, largest: _Optional[_Iterable[float]] = ..., smallest: _Optional[_Iterable[float]] = ...) -> None: ...

class ResidualFloor(_message.Message):
    __slots__ = ("largest", "smallest")
    LARGEST_FIELD_NUMBER: _ClassVar[int]
    SMALLEST_FIELD_NUMBER: _ClassVar[int]
    largest: float
    smallest: float
    def __init__(self, largest: _Optional[float] = ..., smallest: _Optional[float] = ...) -> None: ...

class HessianEigenResult(_message.Message):
    __slots__ = ("largest", "smallest", "residuals", "converged", "hvps", "seconds", "tolerance", "residual_floor")
    LARGEST_FIELD_NUMBER: _ClassVar[int]
    SMALLEST_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    HVPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FLOOR_FIELD_NUMBER: _ClassVar[int]
    largest: _containers.RepeatedScalarFieldContainer[float]
    smallest: _containers.RepeatedScalarFieldContainer[float]
    residuals: EigenResiduals
    converged: bool
    hvps: int
    seconds: float
    tolerance: float
    residual_floor: ResidualFloor
    def __init__(self, largest: _Optional[_Iterable[float]] = ..., smallest: _Optional[_Iterable[float]] = ..., residuals: _Optional[_Union[EigenResiduals, _Mapping]] = ..., converged: _Optional[bool] = ..., hvps: _Optional[int] = ..., seconds: _Optional[float] = ..., tolerance: _Optional[float] = ..., residual_floor: _Optional[_Union[ResidualFloor, _Mapping]] = ...) -> None: ...

class HessianTraceResult(_message.Message):
    __slots__ = ("estimate", "stderr", "method", "hvps", "frobenius_squared", "frobenius_squared_stderr", "seconds", "seeded_eigenpairs")
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HVPS_FIELD_NUMBER: _ClassVar[int]
    FROBENIUS_SQUARED_FIELD_NUMBER: _ClassVar[int]
    FROBENIUS_SQUARED_STDERR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEEDED_EIGENPAIRS_FIELD_NUMBER: _ClassVar[int]
    estimate: float
    stderr: float
    method: str
    hvps: int
    frobenius_squared: float
    frobenius_squared_stderr: float
    seconds: float
    seeded_eigenpairs: int
    def __init__(self, estimate: _Optional[float] = ..., stderr: _Optional[float] = ..., method: _Optional[str] = ..., hvps: _Optional[int] = ..., frobenius_squared: _Optional[float] = ..., frobenius_squared_stderr: _Optional[float] = ..., seconds: _Optional[float] = ..., seeded_eigenpairs: _Optional[int] = ...) -> None: ...

class HessianDensityResult(_message.Message):
    __slots__ = ("grid", "density", "nodes", "weights", "negative_mass", "hvps", "seconds", "density_stderr", "negative_mass_stderr", "near_zero_mass", "near_zero_mass_stderr", "negative_tolerance")
    GRID_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_MASS_FIELD_NUMBER: _ClassVar[int]
    HVPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    DENSITY_STDERR_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_MASS_STDERR_FIELD_NUMBER: _ClassVar[int]
    NEAR_ZERO_MASS_FIELD_NUMBER: _ClassVar[int]
    NEAR_ZERO_MASS_STDERR_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    grid: _containers.RepeatedScalarFieldContainer[float]
    density: _containers.RepeatedScalarFieldContainer[float]
    nodes: _containers.RepeatedScalarFieldContainer[float]
    weights: _containers.RepeatedScalarFieldContainer[float]
    negative_mass: float
    hvps: int
    seconds: float
    density_stderr: _containers.RepeatedScalarFieldContainer[float]
    negative_mass_stderr: float
    near_zero_mass: float
    near_zero_mass_stderr: float
    negative_tolerance: float
    def __init__(self, grid: _Optional[_Iterable[float]] = ..., density: _Optional[_Iterable[float]] = ..., nodes: _Optional[_Iterable[float]] = ..., weights: _Optional[_Iterable[float]] = ..., negative_mass: _Optional[float] = ..., hvps: _Optional[int] = ..., seconds: _Optional[float] = ..., density_stderr: _Optional[_Iterable[float]] = ..., negative_mass_stderr: _Optional[float] = ..., near_zero_mass: _Optional[float] = ..., near_zero_mass_stderr: _Optional[float] = ..., negative_tolerance: _Optional[float] = ...) -> None: ...

class SharpnessResult(_message.Message):
    __slots__ = ("value", "learning_rate", "gd_stable", "margin", "converged", "hvps", "source")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    GD_STABLE_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    HVPS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    value: float
    learning_rate: float
    gd_stable: bool
    margin: float
    converged: bool
    hvps: int
    source: str
    def __init__(self, value: _Optional[float] = ..., learning_rate: _Optional[float] = ..., gd_stable: _Optional[bool] = ..., margin: _Optional[float] = ..., converged: _Optional[bool] = ..., hvps: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class NonUniformityResult(_message.Message):
    __slots__ = ("value", "batch_size", "sgd_stable", "stability_eigenvalue", "learning_rate", "method", "num_samples", "converged", "sharpness", "sharpness_bound", "non_uniformity_bound", "necessary_conditions_met", "stability_converged", "sigma_samples", "products", "seconds", "tolerance", "value_stderr", "stability_eigenvalue_stderr")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SGD_STABLE_FIELD_NUMBER: _ClassVar[int]
    STABILITY_EIGENVALUE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    SHARPNESS_BOUND_FIELD_NUMBER: _ClassVar[int]
    NON_UNIFORMITY_BOUND_FIELD_NUMBER: _ClassVar[int]
    NECESSARY_CONDITIONS_MET_FIELD_NUMBER: _ClassVar[int]
    STABILITY_CONVERGED_FIELD_NUMBER: _ClassVar[int]
    SIGMA_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    VALUE_STDERR_FIELD_NUMBER: _ClassVar[int]
    STABILITY_EIGENVALUE_STDERR_FIELD_NUMBER: _ClassVar[int]
    value: float
    batch_size: int
    sgd_stable: bool
    stability_eigenvalue: float
    learning_rate: float
    method: str
    num_samples: int
    converged: bool
    sharpness: float
    sharpness_bound: float
    non_uniformity_bound: float
    necessary_conditions_met: bool
    stability_converged: bool
    sigma_samples: int
    products: int
    seconds: float
    tolerance: float
    value_stderr: float
    stability_eigenvalue_stderr: float
    def __init__(self, value: _Optional[float] = ..., batch_size: _Optional[int] = ..., sgd_stable: _Optional[bool] = ..., stability_eigenvalue: _Optional[float] = ..., learning_rate: _Optional[float] = ..., method: _Optional[str] = ..., num_samples: _Optional[int] = ..., converged: _Optional[bool] = ..., sharpness: _Optional[float] = ..., sharpness_bound: _Optional[float] = ..., non_uniformity_bound: _Optional[float] = ..., necessary_conditions_met: _Optional[bool] = ..., stability_converged: _Optional[bool] = ..., sigma_samples: _Optional[int] = ..., products: _Optional[int] = ..., seconds: _Optional[float] = ..., tolerance: _Optional[float] = ..., value_stderr: _Optional[float] = ..., stability_eigenvalue_stderr: _Optional[float] = ...) -> None: ...

class LipschitzBounds(_message.Message):
    __slots__ = ("naive", "eclipse_fast", "lipsdp_neuron", "lipsdp_layer", "lower")
    NAIVE_FIELD_NUMBER: _ClassVar[int]
    ECLIPSE_FAST_FIELD_NUMBER: _ClassVar[int]
    LIPSDP_NEURON_FIELD_NUMBER: _ClassVar[int]
    LIPSDP_LAYER_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    naive: float
    eclipse_fast: float
    lipsdp_neuron: float
    lipsdp_layer: float
    lower: float
    def __init__(self, naive: _Optional[float] = ..., eclipse_fast: _Optional[float] = ..., lipsdp_neuron: _Optional[float] = ..., lipsdp_layer: _Optional[float] = ..., lower: _Optional[float] = ...) -> None: ...

class LipschitzResult(_message.Message):
    __slots__ = ("lower", "upper", "method", "bounds", "relative_gap", "note", "details", "chain")
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_GAP_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    lower: float
    upper: float
    method: str
    bounds: LipschitzBounds
    relative_gap: float
    note: str
    details: _containers.RepeatedCompositeFieldContainer[LipschitzBoundDetail]
    chain: LipschitzChain
    def __init__(self, lower: _Optional[float] = ..., upper: _Optional[float] = ..., method: _Optional[str] = ..., bounds: _Optional[_Union[LipschitzBounds, _Mapping]] = ..., relative_gap: _Optional[float] = ..., note: _Optional[str] = ..., details: _Optional[_Iterable[_Union[LipschitzBoundDetail, _Mapping]]] = ..., chain: _Optional[_Union[LipschitzChain, _Mapping]] = ...) -> None: ...

class LipschitzBoundDetail(_message.Message):
    __slots__ = ("method", "value", "status", "seconds", "solver", "solver_value", "pieces", "note")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    SOLVER_VALUE_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    method: str
    value: float
    status: str
    seconds: float
    solver: str
    solver_value: float
    pieces: int
    note: str
    def __init__(self, method: _Optional[str] = ..., value: _Optional[float] = ..., status: _Optional[str] = ..., seconds: _Optional[float] = ..., solver: _Optional[str] = ..., solver_value: _Optional[float] = ..., pieces: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class EpsilonSharpnessResult(_message.Message):
    __slots__ = ("value", "epsilon", "subspace_dim", "loss", "max_loss", "iterations", "evaluations", "seconds", "start_values", "start_spread")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    SUBSPACE_DIM_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    MAX_LOSS_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    START_VALUES_FIELD_NUMBER: _ClassVar[int]
    START_SPREAD_FIELD_NUMBER: _ClassVar[int]
    value: float
    epsilon: float
    subspace_dim: int
    loss: float
    max_loss: float
    iterations: int
    evaluations: int
    seconds: float
    start_values: _containers.RepeatedScalarFieldContainer[float]
    start_spread: float
    def __init__(self, value: _Optional[float] = ..., epsilon: _Optional[float] = ..., subspace_dim: _Optional[int] = ..., loss: _Optional[float] = ..., max_loss: _Optional[float] = ..., iterations: _Optional[int] = ..., evaluations: _Optional[int] = ..., seconds: _Optional[float] = ..., start_values: _Optional[_Iterable[float]] = ..., start_spread: _Optional[float] = ...) -> None: ...

class AdaptiveSharpnessResult(_message.Message):
    __slots__ = ("value", "rho", "norm", "adaptive", "average_case", "steps", "loss", "perturbed_loss", "seconds", "stderr", "start_values", "start_spread")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    RHO_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_CASE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PERTURBED_LOSS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    START_VALUES_FIELD_NUMBER: _ClassVar[int]
    START_SPREAD_FIELD_NUMBER: _ClassVar[int]
    value: float
    rho: float
    norm: str
    adaptive: bool
    average_case: bool
    steps: int
    loss: float
    perturbed_loss: float
    seconds: float
    stderr: float
    start_values: _containers.RepeatedScalarFieldContainer[float]
    start_spread: float
    def __init__(self, value: _Optional[float] = ..., rho: _Optional[float] = ..., norm: _Optional[str] = ..., adaptive: _Optional[bool] = ..., average_case: _Optional[bool] = ..., steps: _Optional[int] = ..., loss: _Optional[float] = ..., perturbed_loss: _Optional[float] = ..., seconds: _Optional[float] = ..., stderr: _Optional[float] = ..., start_values: _Optional[_Iterable[float]] = ..., start_spread: _Optional[float] = ...) -> None: ...

class LayerSpectrum(_message.Message):
    __slots__ = ("name", "spectral_norm", "frobenius_norm", "stable_rank", "alpha", "alpha_xmin", "alpha_ks_distance", "alpha_tail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPECTRAL_NORM_FIELD_NUMBER: _ClassVar[int]
    FROBENIUS_NORM_FIELD_NUMBER: _ClassVar[int]
    STABLE_RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_XMIN_FIELD_NUMBER: _ClassVar[int]
    ALPHA_KS_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_TAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    spectral_norm: float
    frobenius_norm: float
    stable_rank: float
    alpha: float
    alpha_xmin: float
    alpha_ks_distance: float
    alpha_tail: int
    def __init__(self, name: _Optional[str] = ..., spectral_norm: _Optional[float] = ..., frobenius_norm: _Optional[float] = ..., stable_rank: _Optional[float] = ..., alpha: _Optional[float] = ..., alpha_xmin: _Optional[float] = ..., alpha_ks_distance: _Optional[float] = ..., alpha_tail: _Optional[int] = ...) -> None: ...

class WeightSpectraResult(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerSpectrum]
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerSpectrum, _Mapping]]] = ...) -> None: ...

class Results(_message.Message):
    __slots__ = ("hessian_eigen", "hessian_trace", "hessian_density", "sharpness", "non_uniformity", "lipschitz", "epsilon_sharpness", "adaptive_sharpness", "weight_spectra")
    HESSIAN_EIGEN_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_TRACE_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_DENSITY_FIELD_NUMBER: _ClassVar[int]
    SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    NON_UNIFORMITY_FIELD_NUMBER: _ClassVar[int]
    LIPSCHITZ_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SPECTRA_FIELD_NUMBER: _ClassVar[int]
    hessian_eigen: HessianEigenResult
    hessian_trace: HessianTraceResult
    hessian_density: HessianDensityResult
    sharpness: SharpnessResult
    non_uniformity: NonUniformityResult
    lipschitz: LipschitzResult
    epsilon_sharpness: EpsilonSharpnessResult
    adaptive_sharpness: AdaptiveSharpnessResult
    weight_spectra: WeightSpectraResult
    def __init__(self, hessian_eigen: _Optional[_Union[HessianEigenResult, _Mapping]] = ..., hessian_trace: _Optional[_Union[HessianTraceResult, _Mapping]] = ..., hessian_density: _Optional[_Union[HessianDensityResult, _Mapping]] = ..., sharpness: _Optional[_Union[SharpnessResult, _Mapping]] = ..., non_uniformity: _Optional[_Union[NonUniformityResult, _Mapping]] = ..., lipschitz: _Optional[_Union[LipschitzResult, _Mapping]] = ..., epsilon_sharpness: _Optional[_Union[EpsilonSharpnessResult, _Mapping]] = ..., adaptive_sharpness: _Optional[_Union[AdaptiveSharpnessResult, _Mapping]] = ..., weight_spectra: _Optional[_Union[WeightSpectraResult, _Mapping]] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("schema", "model", "data", "loss", "device", "seconds", "results", "per_layer", "curvature", "precision", "seed", "server_version", "run")
    class PerLayerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Results
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Results, _Mapping]] = ...) -> None: ...
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    schema: str
    model: ModelSummary
    data: DataSummary
    loss: LossSummary
    device: str
    seconds: float
    results: Results
    per_layer: _containers.MessageMap[str, Results]
    curvature: str
    precision: str
    seed: int
    server_version: str
    run: RunSummary
    def __init__(self, schema: _Optional[str] = ..., model: _Optional[_Union[ModelSummary, _Mapping]] = ..., data: _Optional[_Union[DataSummary, _Mapping]] = ..., loss: _Optional[_Union[LossSummary, _Mapping]] = ..., device: _Optional[str] = ..., seconds: _Optional[float] = ..., results: _Optional[_Union[Results, _Mapping]] = ..., per_layer: _Optional[_Mapping[str, Results]] = ..., curvature: _Optional[str] = ..., precision: _Optional[str] = ..., seed: _Optional[int] = ..., server_version: _Optional[str] = ..., run: _Optional[_Union[RunSummary, _Mapping]] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("planned_peak_bytes", "measured_peak_bytes", "choices", "memory_budget_bytes", "memory_budget_source", "analyses")
    class ChoicesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PLANNED_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEASURED_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_SOURCE_FIELD_NUMBER: _ClassVar[int]
    ANALYSES_FIELD_NUMBER: _ClassVar[int]
    planned_peak_bytes: int
    measured_peak_bytes: int
    choices: _containers.ScalarMap[str, str]
    memory_budget_bytes: int
    memory_budget_source: str
    analyses: _containers.RepeatedCompositeFieldContainer[AnalysisMemory]
    def __init__(self, planned_peak_bytes: _Optional[int] = ..., measured_peak_bytes: _Optional[int] = ..., choices: _Optional[_Mapping[str, str]] = ..., memory_budget_bytes: _Optional[int] = ..., memory_budget_source: _Optional[str] = ..., analyses: _Optional[_Iterable[_Union[AnalysisMemory, _Mapping]]] = ...) -> None: ...

class AnalysisMemory(_message.Message):
    __slots__ = ("analysis", "block", "planned_peak_bytes", "measured_peak_bytes")
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    PLANNED_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEASURED_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    analysis: str
    block: str
    planned_peak_bytes: int
    measured_peak_bytes: int
    def __init__(self, analysis: _Optional[str] = ..., block: _Optional[str] = ..., planned_peak_bytes: _Optional[int] = ..., measured_peak_bytes: _Optional[int] = ...) -> None: ...

class GetCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("name", "description", "memory_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    memory_bytes: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_upload_bytes", "max_queue_depth", "upload_chunk_bytes", "max_hvps", "max_parameters", "max_samples", "max_analysis_seconds", "concurrency_per_device", "memory_budget_bytes")
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_HVPS_FIELD_NUMBER: _ClassVar[int]
    MAX_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_ANALYSIS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_upload_bytes: int
    max_queue_depth: int
    upload_chunk_bytes: int
    max_hvps: int
    max_parameters: int
    max_samples: int
    max_analysis_seconds: float
    concurrency_per_device: int
    memory_budget_bytes: int
    def __init__(self, max_upload_bytes: _Optional[int] = ..., max_queue_depth: _Optional[int] = ..., upload_chunk_bytes: _Optional[int] = ..., max_hvps: _Optional[int] = ..., max_parameters: _Optional[int] = ..., max_samples: _Optional[int] = ..., max_analysis_seconds: _Optional[float] = ..., concurrency_per_device: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("server_version", "api_version", "torch_version", "devices", "analyses", "losses", "curvatures", "model_formats", "architectures", "limits", "auth_required")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ANALYSES_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    CURVATURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FORMATS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    api_version: str
    torch_version: str
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    analyses: _containers.RepeatedScalarFieldContainer[str]
    losses: _containers.RepeatedScalarFieldContainer[str]
    curvatures: _containers.RepeatedScalarFieldContainer[str]
    model_formats: _containers.RepeatedScalarFieldContainer[str]
    architectures: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    auth_required: bool
    def __init__(self, server_version: _Optional[str] = ..., api_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., analyses: _Optional[_Iterable[str]] = ..., losses: _Optional[_Iterable[str]] = ..., curvatures: _Optional[_Iterable[str]] = ..., model_formats: _Optional[_Iterable[str]] = ..., architectures: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., auth_required: _Optional[bool] = ...) -> None: ...
