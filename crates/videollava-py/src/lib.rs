//! `videollava._native`: the compiled half of the `videollava` Python package.
//!
//! The public API (`videollava.VideoLlava`, `videollava.Processor`) is Python
//! (`python/videollava/__init__.py`): it turns paths, bytes, numpy arrays and PIL images into
//! the media tuples this module reads, and numpy arrays out of the buffers it returns. This module
//! converts between Python and [`backend`], and releases the GIL around every costly call (load,
//! decode, preprocess, generate).
//!
//! Media tuples: `("path", str, ())`, `("bytes", bytes, ())` (an encoded file), or
//! `("pixels", bytes, shape)` with `shape` `(H, W, 3)` (an image) or `(T, H, W, 3)` (a clip), u8
//! row-major. Arrays come back as `(bytearray, shape, dtype)` with dtype `"<i8"`, `"<f4"` or `"|u1"`.

mod backend;

/// Large blocks on transparent huge pages, as the CLI (see [`videollava::huge_pages`]): the
/// engine's own allocations go through it, Python's do not.
#[global_allocator]
static ALLOC: videollava::huge_pages::HugePages = videollava::huge_pages::HugePages;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyStopIteration, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString};

use backend::{Cancel, Generated, LoadConfig, Medium, ProcessorOutput, SamplingParams, Settings, StageTimings};

/// The Python exception for a library error: a class of `videollava.errors` chosen by the
/// error's kind, carrying the library's message.
fn to_py_err(e: backend::Error) -> PyErr {
    use backend::Error as E;
    let class = match &e {
        E::Io { .. } => "FileError",
        E::Config { .. } => "ConfigError",
        E::Media { .. } => "MediaError",
        E::Input(_) => "InputError",
        E::Tokenizer(_) => "TokenizerError",
        E::Model(_) | E::Tensor(_) => "ModelError",
        E::Output { .. } => "OutputError",
        E::Cancelled(_) => "CancelledError",
    };
    let message = e.to_string();
    Python::attach(|py| {
        let raised =
            py.import("videollava.errors").and_then(|m| m.getattr(class)).and_then(|cls| cls.call1((message.clone(),)));
        match raised {
            Ok(exc) => PyErr::from_value(exc),
            Err(_) => PyRuntimeError::new_err(message),
        }
    })
}

/// Reads one media tuple (see the module docs).
fn medium(obj: &Bound<'_, PyAny>) -> PyResult<Medium> {
    let (kind, data, shape): (String, Bound<'_, PyAny>, Vec<usize>) = obj.extract()?;
    let bytes = |d: &Bound<'_, PyAny>| -> PyResult<Vec<u8>> {
        Ok(d.cast::<PyBytes>().map_err(|_| PyTypeError::new_err("media data must be bytes"))?.as_bytes().to_vec())
    };
    match kind.as_str() {
        "path" => Ok(Medium::Path(PathBuf::from(data.extract::<String>()?))),
        "bytes" => Ok(Medium::Encoded(bytes(&data)?)),
        "pixels" => Ok(Medium::Pixels { shape, data: bytes(&data)? }),
        other => Err(PyTypeError::new_err(format!("unknown media kind `{other}`"))),
    }
}

fn media(list: &Bound<'_, PyList>) -> PyResult<Vec<Medium>> {
    list.iter().map(|o| medium(&o)).collect()
}

/// An array for Python: `(bytearray, shape, dtype)`.
fn array<'py>(py: Python<'py>, bytes: &[u8], shape: &[usize], dtype: &str) -> PyResult<Bound<'py, PyAny>> {
    Ok((PyByteArray::new(py, bytes), shape.to_vec(), dtype).into_pyobject(py)?.into_any())
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// transformers' `BatchFeature` keys to arrays.
fn processor_output<'py>(py: Python<'py>, out: &ProcessorOutput) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    let shape = [out.batch_size, out.seq_len];
    dict.set_item("input_ids", array(py, &i64_bytes(&out.input_ids), &shape, "<i8")?)?;
    dict.set_item("attention_mask", array(py, &i64_bytes(&out.attention_mask), &shape, "<i8")?)?;
    if let Some(t) = &out.pixel_values_images {
        dict.set_item("pixel_values_images", array(py, &f32_bytes(&t.data), &t.shape, "<f4")?)?;
    }
    if let Some(t) = &out.pixel_values_videos {
        dict.set_item("pixel_values_videos", array(py, &f32_bytes(&t.data), &t.shape, "<f4")?)?;
    }
    Ok(dict)
}

/// One result as a dict (the fields of `videollava.GenerationOutput`).
fn generated<'py>(py: Python<'py>, g: &Generated, timings: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("text", &g.text)?;
    d.set_item("token_ids", &g.token_ids)?;
    d.set_item("logprobs", &g.logprobs)?;
    d.set_item("top_logprobs", &g.top_logprobs)?;
    d.set_item("finish_reason", g.finish_reason)?;
    d.set_item("prompt_tokens", g.prompt_tokens)?;
    d.set_item("timings", timings.copy()?)?;
    Ok(d)
}

fn timings_dict<'py>(py: Python<'py>, t: &StageTimings, media_ms: f64) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in [
        ("load", t.load_ms),
        ("media", media_ms),
        ("preprocess", t.preprocess_ms),
        ("vision", t.vision_ms),
        ("prefill", t.prefill_ms),
        ("decode", t.decode_ms),
    ] {
        d.set_item(k, v)?;
    }
    Ok(d)
}

fn results<'py>(py: Python<'py>, r: &GenerateResult) -> PyResult<Bound<'py, PyList>> {
    let timings = timings_dict(py, &r.timings, r.media_ms)?;
    let items = r.outputs.iter().map(|g| generated(py, g, &timings)).collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

/// What one generation call needs, gathered while the GIL is held.
struct Request {
    prompts: Vec<String>,
    images: Vec<Medium>,
    videos: Vec<Medium>,
    video_options: backend::VideoOptions,
    settings: Settings,
}

struct GenerateResult {
    outputs: Vec<Generated>,
    timings: StageTimings,
    media_ms: f64,
}

/// A loaded model, shared with stream worker threads; `lock` lets one generation run at a time.
struct Shared {
    model: backend::Model,
    lock: Mutex<()>,
    /// Tokens generated since the load, by every call (`VideoLlava.tokens_generated`).
    tokens_generated: AtomicU64,
}

impl Shared {
    /// Decodes the media and generates (blocking; call without the GIL); stops early with
    /// `Error::Cancelled` once `cancel` is set.
    fn run(
        &self,
        request: Request,
        cancel: &Cancel,
        on_token: &mut dyn FnMut(usize, &str),
    ) -> backend::Result<GenerateResult> {
        let options = self.model.options(&request.settings)?;
        let (images, videos, media_ms) =
            backend::decode_media(request.images, request.videos, &request.video_options, cancel)?;
        let _guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (outputs, timings) =
            self.model.generate(&request.prompts, &images, &videos, &options, cancel, &mut |row, delta| {
                self.tokens_generated.fetch_add(1, Ordering::Relaxed);
                on_token(row, delta)
            })?;
        Ok(GenerateResult { outputs, timings, media_ms })
    }
}

/// A loaded checkpoint (use `videollava.VideoLlava`).
#[pyclass(frozen, module = "videollava._native")]
struct NativeModel {
    shared: Arc<Shared>,
}

#[allow(clippy::too_many_arguments)]
#[pymethods]
impl NativeModel {
    /// Resolves `model` (directory or hub id) and loads it, without the GIL.
    #[staticmethod]
    #[pyo3(signature = (model, dtype, quantize, quantized_cache, mmap, kv_cache, feature_cache_mib, prefill_chunk))]
    fn load(
        py: Python<'_>,
        model: String,
        dtype: String,
        quantize: Option<String>,
        quantized_cache: Option<String>,
        mmap: bool,
        kv_cache: String,
        feature_cache_mib: usize,
        prefill_chunk: Option<usize>,
    ) -> PyResult<Self> {
        let config =
            LoadConfig { model, dtype, quantize, quantized_cache, mmap, kv_cache, feature_cache_mib, prefill_chunk };
        let model = py.detach(|| backend::Model::load(&config)).map_err(to_py_err)?;
        Ok(Self { shared: Arc::new(Shared { model, lock: Mutex::new(()), tokens_generated: AtomicU64::new(0) }) })
    }

    /// The prompt for `text` with `images` images and `videos` videos (see `VideoLlava.prompt`).
    fn chat_prompt(&self, text: &str, images: usize, videos: usize) -> PyResult<String> {
        self.shared.model.chat_prompt(text, images, videos).map_err(to_py_err)
    }

    /// The checkpoint's processor (a copy that shares nothing mutable).
    fn processor(&self) -> NativeProcessor {
        NativeProcessor { processor: Arc::new(self.shared.model.processor().clone()) }
    }

    #[getter]
    fn model_dir(&self) -> String {
        self.shared.model.model_dir().display().to_string()
    }

    #[getter]
    fn load_ms(&self) -> f64 {
        self.shared.model.load_ms()
    }

    /// Tokens generated since the load, by every call (an abandoned stream's included).
    #[getter]
    fn tokens_generated(&self) -> u64 {
        self.shared.tokens_generated.load(Ordering::Relaxed)
    }

    /// Generates for a batch of chat-format prompts; returns one dict per prompt.
    #[pyo3(signature = (prompts, images, videos, num_frames, frame_sampling, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos, top_logprobs))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<String>,
        images: &Bound<'py, PyList>,
        videos: &Bound<'py, PyList>,
        num_frames: usize,
        frame_sampling: &str,
        max_new_tokens: Option<usize>,
        temperature: f64,
        top_k: usize,
        top_p: f64,
        min_p: f64,
        repetition_penalty: f64,
        seed: u64,
        stop: Vec<String>,
        ignore_eos: bool,
        top_logprobs: usize,
    ) -> PyResult<Bound<'py, PyList>> {
        let request = request(
            prompts,
            images,
            videos,
            num_frames,
            frame_sampling,
            max_new_tokens,
            SamplingParams { temperature, top_k, top_p, min_p, repetition_penalty, seed },
            stop,
            ignore_eos,
            top_logprobs,
        )?;
        let shared = self.shared.clone();
        let result = py.detach(move || shared.run(request, &Cancel::new(), &mut |_, _| {})).map_err(to_py_err)?;
        results(py, &result)
    }

    /// Starts generation on a worker thread; the returned iterator yields `(row, text)` pieces.
    /// Dropping or closing the iterator stops the generation at its next decode step.
    #[pyo3(signature = (prompts, images, videos, num_frames, frame_sampling, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, ignore_eos, top_logprobs))]
    fn stream(
        &self,
        prompts: Vec<String>,
        images: &Bound<'_, PyList>,
        videos: &Bound<'_, PyList>,
        num_frames: usize,
        frame_sampling: &str,
        max_new_tokens: Option<usize>,
        temperature: f64,
        top_k: usize,
        top_p: f64,
        min_p: f64,
        repetition_penalty: f64,
        seed: u64,
        stop: Vec<String>,
        ignore_eos: bool,
        top_logprobs: usize,
    ) -> PyResult<NativeStream> {
        let request = request(
            prompts,
            images,
            videos,
            num_frames,
            frame_sampling,
            max_new_tokens,
            SamplingParams { temperature, top_k, top_p, min_p, repetition_penalty, seed },
            stop,
            ignore_eos,
            top_logprobs,
        )?;
        // Bad settings raise here, not from the first `next()`.
        self.shared.model.options(&request.settings).map_err(to_py_err)?;
        let (tx, rx) = channel();
        let shared = self.shared.clone();
        let cancel = Cancel::new();
        let worker_cancel = cancel.clone();
        let worker = std::thread::Builder::new()
            .name("videollava-stream".into())
            .spawn(move || {
                let result = shared.run(request, &worker_cancel, &mut |row, delta| {
                    // A failed send means the iterator is gone (its Drop also sets the flag).
                    if !delta.is_empty() && tx.send(Event::Piece(row, delta.to_string())).is_err() {
                        worker_cancel.cancel();
                    }
                });
                let _ = tx.send(Event::Done(result));
            })
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the generation thread: {e}")))?;
        Ok(NativeStream {
            rx: Mutex::new(Some(rx)),
            result: Mutex::new(None),
            cancel,
            worker: Mutex::new(Some(worker)),
            closed: AtomicBool::new(false),
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn request(
    prompts: Vec<String>,
    images: &Bound<'_, PyList>,
    videos: &Bound<'_, PyList>,
    num_frames: usize,
    frame_sampling: &str,
    max_new_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    ignore_eos: bool,
    top_logprobs: usize,
) -> PyResult<Request> {
    Ok(Request {
        prompts,
        images: media(images)?,
        videos: media(videos)?,
        video_options: backend::video_options(num_frames, frame_sampling).map_err(to_py_err)?,
        settings: Settings { max_new_tokens, sampling, stop, ignore_eos, top_logprobs },
    })
}

enum Event {
    Piece(usize, String),
    Done(backend::Result<GenerateResult>),
}

/// Text pieces of a running generation, as `(row, text)`; `result()` after the end. Dropping
/// it or calling `close()` cancels the generation (it stops before its next decode step).
#[pyclass(module = "videollava._native")]
struct NativeStream {
    /// `None` once the end was seen or the stream was closed.
    rx: Mutex<Option<Receiver<Event>>>,
    result: Mutex<Option<GenerateResult>>,
    /// Set on drop and by `close()`; the worker's generation checks it before every decode step.
    cancel: Cancel,
    /// The worker thread, until `close()` joins it.
    worker: Mutex<Option<JoinHandle<()>>>,
    /// `close()` was called before the end: iteration stops, with no result.
    closed: AtomicBool,
}

impl Drop for NativeStream {
    fn drop(&mut self) {
        // Abandoned (garbage-collected, or the loop broke off): stop generating. No join here,
        // so that a drop never blocks; the worker ends within one decode step.
        self.cancel.cancel();
    }
}

#[pymethods]
impl NativeStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<(usize, String)> {
        loop {
            // Wait without the GIL, waking to let Ctrl-C through.
            let event = py.detach(|| {
                let guard = self.rx.lock().unwrap_or_else(|p| p.into_inner());
                match guard.as_ref() {
                    None => Err(RecvTimeoutError::Disconnected),
                    Some(rx) => rx.recv_timeout(Duration::from_millis(100)),
                }
            });
            match event {
                Ok(Event::Piece(row, text)) => return Ok((row, text)),
                Ok(Event::Done(result)) => {
                    *self.rx.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    let result = result.map_err(to_py_err)?;
                    *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
                    return Err(PyStopIteration::new_err(()));
                }
                Err(RecvTimeoutError::Timeout) => py.check_signals()?,
                Err(RecvTimeoutError::Disconnected) => {
                    let finished = self.result.lock().unwrap_or_else(|p| p.into_inner()).is_some();
                    return Err(if finished || self.closed.load(Ordering::SeqCst) {
                        PyStopIteration::new_err(())
                    } else {
                        PyRuntimeError::new_err("the generation thread ended without a result")
                    });
                }
            }
        }
    }

    /// Stops the generation if it is still running and waits (without the GIL) until its thread
    /// has ended, so that the model is free on return. Iteration then stops; `result()` stays
    /// None unless the generation had already finished. Closing again does nothing.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let finished = self.result.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if !finished {
            self.closed.store(true, Ordering::SeqCst);
        }
        self.cancel.cancel();
        *self.rx.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = worker {
            py.detach(|| handle.join()).map_err(|_| PyRuntimeError::new_err("the generation thread panicked"))?;
        }
        Ok(())
    }

    /// Whether `close()` stopped the stream before its end.
    #[getter]
    fn cancelled(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The results (one dict per prompt) once the iterator is exhausted, else None.
    fn result<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        let guard = self.result.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(|r| results(py, r)).transpose()
    }
}

/// A checkpoint's processor (use `videollava.Processor`).
#[pyclass(frozen, module = "videollava._native")]
struct NativeProcessor {
    processor: Arc<backend::Processor>,
}

#[pymethods]
impl NativeProcessor {
    /// Loads the processor files of `model` (directory or hub id).
    #[staticmethod]
    fn load(py: Python<'_>, model: String) -> PyResult<Self> {
        let processor = py.detach(|| backend::load_processor(&model)).map_err(to_py_err)?;
        Ok(Self { processor: Arc::new(processor) })
    }

    /// Prompts verbatim plus media to transformers' processor outputs.
    fn process<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<String>,
        images: &Bound<'py, PyList>,
        videos: &Bound<'py, PyList>,
        num_frames: usize,
        frame_sampling: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (images, videos) = (media(images)?, media(videos)?);
        let options = backend::video_options(num_frames, frame_sampling).map_err(to_py_err)?;
        let processor = self.processor.clone();
        let out = py
            .detach(move || {
                let (images, videos, _) = backend::decode_media(images, videos, &options, &Cancel::new())?;
                backend::process(&processor, &prompts, &images, &videos)
            })
            .map_err(to_py_err)?;
        processor_output(py, &out)
    }

    /// Decodes token ids to text.
    #[pyo3(signature = (ids, skip_special_tokens = true))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        self.processor.decode(&ids, skip_special_tokens).map_err(to_py_err)
    }
}

/// Decodes one image to `(bytearray, (H, W, 3), "|u1")`.
#[pyfunction]
fn load_image<'py>(py: Python<'py>, medium_tuple: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let m = medium(medium_tuple)?;
    let image = py.detach(|| backend::decode_image(m, "image")).map_err(to_py_err)?;
    array(py, &image.data, &[image.height, image.width, 3], "|u1")
}

/// Decodes one video to `(bytearray, (T, H, W, 3), "|u1")` and the chosen frame indices.
#[pyfunction]
fn load_video<'py>(
    py: Python<'py>,
    medium_tuple: &Bound<'py, PyAny>,
    num_frames: usize,
    frame_sampling: &str,
) -> PyResult<(Bound<'py, PyAny>, Vec<usize>)> {
    let m = medium(medium_tuple)?;
    let options = backend::video_options(num_frames, frame_sampling).map_err(to_py_err)?;
    let video = py.detach(|| backend::decode_video(m, &options, "video", &Cancel::new())).map_err(to_py_err)?;
    let (h, w) = video.frames.first().map_or((0, 0), |f| (f.height, f.width));
    let data: Vec<u8> = video.frames.iter().flat_map(|f| f.data.iter().copied()).collect();
    Ok((array(py, &data, &[video.frames.len(), h, w, 3], "|u1")?, video.frame_indices))
}

/// The compiled half of the `videollava` package (see `videollava.VideoLlava`).
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeModel>()?;
    m.add_class::<NativeProcessor>()?;
    m.add_class::<NativeStream>()?;
    m.add_function(wrap_pyfunction!(load_image, m)?)?;
    m.add_function(wrap_pyfunction!(load_video, m)?)?;
    m.add("DEFAULT_MODEL", backend::DEFAULT_MODEL)?;
    m.add("MAX_FRAMES", backend::MAX_FRAMES)?;
    m.add("__version__", PyString::new(m.py(), env!("CARGO_PKG_VERSION")))?;
    Ok(())
}
