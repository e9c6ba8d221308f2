"""Videos given by URL: `data:` (base64, as OpenAI-style clients send them), `file://` and `http(s)://`, read by
`decode_video` and the processor as the file itself, with a size cap and a clear error for each bad URL. The http
tests serve files from a loopback server the test starts."""

import base64
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from video_test_files import write_video

from ppllava_hf import VideoDecodingError, decode_video
from ppllava_hf.testing.tiny import tiny_processor


class Server(http.server.ThreadingHTTPServer):
    """A loopback server of `files` (path -> bytes); `/no-length/...` serves the same bytes without a Content-Length."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        unsized = self.path.startswith("/no-length/")
        body = self.server.files.get(self.path.removeprefix("/no-length") if unsized else self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        if not unsized:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("urls") / "clip.mp4", "libx264", 20)


@pytest.fixture
def server(clip, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    served = Server({"/clip.mp4": clip.read_bytes()})
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    yield served
    served.shutdown()
    served.server_close()


def data_url(path: Path, media_type: str = "video/mp4") -> str:
    return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode()


def assert_same_video(decoded, expected):
    frames, metadata = decoded
    np.testing.assert_array_equal(frames, expected[0])  # the same bytes decode to the same uint8 frames
    assert metadata.frames_indices == expected[1].frames_indices
    assert metadata.total_num_frames == expected[1].total_num_frames


def test_a_base64_data_url_is_read_as_the_file_it_holds(clip):
    assert_same_video(decode_video(data_url(clip), num_frames=6), decode_video(clip, num_frames=6))


def test_a_data_url_without_a_media_type_is_read_too(clip):
    url = "data:;base64," + base64.b64encode(clip.read_bytes()).decode()
    assert_same_video(decode_video(url, num_frames=4), decode_video(clip, num_frames=4))


def test_url_schemes_are_case_insensitive(clip):
    url = "DATA:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    assert_same_video(decode_video(url, num_frames=4), decode_video(clip, num_frames=4))


def test_a_file_url_is_read_as_its_path(clip):
    assert_same_video(decode_video(clip.as_uri(), num_frames=6), decode_video(clip, num_frames=6))


def test_an_http_url_is_downloaded_and_read(clip, server):
    assert_same_video(decode_video(f"{server.url}/clip.mp4", num_frames=6), decode_video(clip, num_frames=6))


def test_an_http_download_without_a_declared_length_is_read_too(clip, server):
    assert_same_video(decode_video(f"{server.url}/no-length/clip.mp4", num_frames=3), decode_video(clip, num_frames=3))


def test_the_processor_reads_a_data_url_as_the_file(clip):
    processor = tiny_processor("vicuna")
    prompt = "USER: <video>\nWhat happens? ASSISTANT: "
    from_url = processor(text=prompt, videos=[data_url(clip)])
    from_file = processor(text=prompt, videos=[str(clip)])
    assert from_url["input_ids"].tolist() == from_file["input_ids"].tolist()
    np.testing.assert_array_equal(from_url["pixel_values_videos"].numpy(), from_file["pixel_values_videos"].numpy())


def test_an_oversized_data_url_is_refused_before_it_is_decoded(clip):
    with pytest.raises(VideoDecodingError, match="more than max_url_bytes=1000.*raise max_url_bytes"):
        decode_video(data_url(clip), max_url_bytes=1000)


def test_the_processor_applies_its_size_cap(clip):
    processor = tiny_processor("vicuna")
    with pytest.raises(VideoDecodingError, match="more than max_url_bytes=1000"):
        processor(text="USER: <video>\nWhat? ASSISTANT: ", videos=[data_url(clip)], max_url_bytes=1000)


def test_an_oversized_download_is_refused_by_its_declared_length(server):
    with pytest.raises(VideoDecodingError, match="more than max_url_bytes=1000"):
        decode_video(f"{server.url}/clip.mp4", max_url_bytes=1000)


def test_an_oversized_download_without_a_declared_length_is_cut_off(server):
    with pytest.raises(VideoDecodingError, match="more than max_url_bytes=1000"):
        decode_video(f"{server.url}/no-length/clip.mp4", max_url_bytes=1000)


def test_a_missing_http_file_names_the_status(server):
    with pytest.raises(VideoDecodingError, match="Cannot fetch the video at http://127.0.0.1:.*/gone.mp4: HTTP 404"):
        decode_video(f"{server.url}/gone.mp4")


def test_an_unreachable_server_is_a_decoding_error_with_the_fix(server):
    address = server.url
    server.shutdown()
    server.server_close()
    with pytest.raises(VideoDecodingError, match="Cannot fetch the video.*download the file and pass its path"):
        decode_video(f"{address}/clip.mp4")


def test_a_data_url_that_is_not_base64_is_refused():
    with pytest.raises(VideoDecodingError, match="not valid base64"):
        decode_video("data:video/mp4;base64,@@not-base64@@")


def test_a_data_url_of_bytes_that_are_not_a_video_is_refused():
    url = "data:video/mp4;base64," + base64.b64encode(b"\x00" * 512).decode()
    with pytest.raises(VideoDecodingError, match="corrupt, truncated or not a video"):
        decode_video(url)


def test_an_empty_data_url_is_refused():
    with pytest.raises(VideoDecodingError, match="holds no bytes"):
        decode_video("data:video/mp4;base64,")


def test_a_data_url_without_its_comma_is_refused():
    with pytest.raises(VideoDecodingError, match="no ',' before its data"):
        decode_video("data:video/mp4;base64")


def test_a_url_of_another_scheme_is_refused_by_name():
    with pytest.raises(VideoDecodingError, match="Unsupported video URL scheme 'ftp'.*data:, file:// or http"):
        decode_video("ftp://example.com/clip.mp4")


def test_a_file_url_on_another_host_is_refused():
    with pytest.raises(VideoDecodingError, match="names the host 'example.com'"):
        decode_video("file://example.com/clip.mp4")


def test_a_chat_video_given_by_url_is_read_as_the_file(clip):
    processor = tiny_processor("vicuna")

    def chat(video: dict):
        messages = [{"role": "user", "content": [{"type": "video", **video}, {"type": "text", "text": "What happens?"}]}]
        return processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)

    from_url, from_file = chat({"url": data_url(clip)}), chat({"path": str(clip)})
    assert from_url["input_ids"].tolist() == from_file["input_ids"].tolist()
    np.testing.assert_array_equal(from_url["pixel_values_videos"].numpy(), from_file["pixel_values_videos"].numpy())
