//! Closed segments at rest: the zstd seekable layout, so that a reader can start at any byte of
//! the segment's content by decompressing one frame.
//!
//! A compressed segment `segment-<20 digits>.jsonl.zst` holds the same content as the segment it
//! replaces: independent zstd frames of whole lines (about [`FRAME_BYTES`] of content each),
//! then a skippable frame with the seek table of the zstd seekable format (each frame's
//! compressed and content sizes, the frame count, the descriptor and the magic number). Store
//! positions stay offsets into the content, so a segment keeps its positions when it is
//! compressed. `zstd -d` and `zstdcat` read these files as they are: they decompress the frames
//! in order and pass over the seek table.

use super::{io_err, sync_dir, FileBusError};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// What a compressed segment's name adds to the segment's own name.
pub const COMPRESSED_SUFFIX: &str = ".zst";
/// Content bytes per frame: a reader starting anywhere decompresses at most this much that it
/// does not need, and frames this large compress to about a twelfth of recorded events.
pub const FRAME_BYTES: usize = 1 << 20;
/// The zstd level: compression runs once per closed segment, away from the ingest path, and
/// decompression speed hardly depends on the level; 6 keeps a 64 MiB segment under a second.
pub const LEVEL: i32 = 6;

const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
const FOOTER_BYTES: u64 = 9;
const ENTRY_BYTES: u64 = 8;

/// One frame of a compressed segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Where the frame starts in the file.
    pub file_offset: u64,
    pub compressed_len: u32,
    /// Where its content starts in the segment's content.
    pub content_offset: u64,
    pub content_len: u32,
}

/// The frames of a compressed segment, in content order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeekTable {
    pub frames: Vec<Frame>,
}

impl SeekTable {
    /// Bytes of content (the uncompressed segment's length).
    pub fn content_len(&self) -> u64 {
        self.frames
            .last()
            .map_or(0, |f| f.content_offset + u64::from(f.content_len))
    }

    /// The frame holding content byte `offset`.
    pub fn frame_at(&self, offset: u64) -> Option<usize> {
        let index = self
            .frames
            .partition_point(|f| f.content_offset + u64::from(f.content_len) <= offset);
        (index < self.frames.len()).then_some(index)
    }

    /// Reads the seek table at the end of `file`.
    pub fn read(file: &File, path: &Path) -> Result<SeekTable, FileBusError> {
        let bad = |why: &str| FileBusError::Corrupt {
            path: path.to_owned(),
            reason: why.to_owned(),
        };
        let len = file.metadata().map_err(io_err("inspect", path))?.len();
        if len < FOOTER_BYTES + 8 {
            return Err(bad("too short for a seek table"));
        }
        let mut footer = [0u8; FOOTER_BYTES as usize];
        file.read_exact_at(&mut footer, len - FOOTER_BYTES)
            .map_err(io_err("read", path))?;
        let count = u64::from(u32::from_le_bytes([
            footer[0], footer[1], footer[2], footer[3],
        ]));
        if u32::from_le_bytes([footer[5], footer[6], footer[7], footer[8]]) != SEEKABLE_MAGIC {
            return Err(bad("no seek table at the end"));
        }
        if footer[4] & 0x80 != 0 {
            return Err(bad("seek table with checksums (not written by Pleiades)"));
        }
        let table_bytes = count * ENTRY_BYTES + FOOTER_BYTES;
        let Some(header_at) = len.checked_sub(table_bytes + 8) else {
            return Err(bad("seek table longer than the file"));
        };
        let mut table = vec![0u8; (table_bytes + 8 - FOOTER_BYTES) as usize];
        file.read_exact_at(&mut table, header_at)
            .map_err(io_err("read", path))?;
        let word = |at: usize| {
            u32::from_le_bytes([table[at], table[at + 1], table[at + 2], table[at + 3]])
        };
        if word(0) != SKIPPABLE_MAGIC || u64::from(word(4)) != table_bytes {
            return Err(bad("malformed seek table frame"));
        }
        let mut frames = Vec::with_capacity(count as usize);
        let (mut file_offset, mut content_offset) = (0u64, 0u64);
        for n in 0..count as usize {
            let compressed_len = word(8 + n * 8);
            let content_len = word(12 + n * 8);
            frames.push(Frame {
                file_offset,
                compressed_len,
                content_offset,
                content_len,
            });
            file_offset += u64::from(compressed_len);
            content_offset += u64::from(content_len);
        }
        if file_offset != header_at {
            return Err(bad("frame sizes do not add up to the file"));
        }
        Ok(SeekTable { frames })
    }
}

/// Decompresses frame `frame` of `file` into `out` (replacing its contents).
pub fn read_frame(
    file: &File,
    path: &Path,
    frame: &Frame,
    out: &mut Vec<u8>,
) -> Result<(), FileBusError> {
    let mut compressed = vec![0u8; frame.compressed_len as usize];
    file.read_exact_at(&mut compressed, frame.file_offset)
        .map_err(io_err("read", path))?;
    out.clear();
    out.reserve(frame.content_len as usize);
    let mut decoder = zstd::stream::read::Decoder::with_buffer(&compressed[..])
        .map_err(io_err("decompress", path))?
        .single_frame();
    decoder
        .read_to_end(out)
        .map_err(io_err("decompress", path))?;
    if out.len() != frame.content_len as usize {
        return Err(FileBusError::Corrupt {
            path: path.to_owned(),
            reason: format!(
                "a frame at byte {} holds {} bytes, its seek table says {}",
                frame.file_offset,
                out.len(),
                frame.content_len
            ),
        });
    }
    Ok(())
}

/// What compressing one segment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compressed {
    pub path: PathBuf,
    pub content_bytes: u64,
    pub compressed_bytes: u64,
}

/// The compressed name of segment file `plain`.
pub fn compressed_path(plain: &Path) -> PathBuf {
    let mut name = plain.as_os_str().to_owned();
    name.push(COMPRESSED_SUFFIX);
    PathBuf::from(name)
}

/// Replaces the closed segment `plain` by its compressed form. The compressed file is written
/// under a temporary name, synced, given the segment's modification time and renamed into place
/// before the plain file is removed, so a crash at any instant leaves one complete copy (both,
/// at worst, which readers treat as one segment). A reader holding the plain file open keeps
/// reading it.
pub fn compress_segment(plain: &Path, level: i32) -> Result<Compressed, FileBusError> {
    let target = compressed_path(plain);
    let mut temporary = target.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let source = File::open(plain).map_err(io_err("open", plain))?;
    let meta = source.metadata().map_err(io_err("inspect", plain))?;
    let written = write_frames(&source, plain, &temporary, level);
    let (content_bytes, compressed_bytes) = match written {
        Ok(sizes) => sizes,
        Err(e) => {
            let _ = std::fs::remove_file(&temporary);
            return Err(e);
        }
    };
    if let Ok(modified) = meta.modified() {
        // Retention and operators read a segment's age from it; it is when the last line was
        // written, not when the segment was compressed.
        let _ = File::options()
            .write(true)
            .open(&temporary)
            .and_then(|f| f.set_modified(modified));
    }
    // Retention may delete a counted segment before the compressor is done with it (the
    // budget does not wait for a busy host): then the copy is dropped, not brought back.
    if !plain.exists() {
        let _ = std::fs::remove_file(&temporary);
        return Err(FileBusError::Io {
            op: "compress",
            path: plain.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    std::fs::rename(&temporary, &target).map_err(io_err("rename", &temporary))?;
    let dir = plain.parent().unwrap_or(Path::new("."));
    sync_dir(dir)?;
    std::fs::remove_file(plain).map_err(io_err("remove", plain))?;
    sync_dir(dir)?;
    Ok(Compressed {
        path: target,
        content_bytes,
        compressed_bytes,
    })
}

/// Writes the frames and the seek table of `source` to `temporary`; returns the content and
/// compressed sizes. A partial last line (there is none in a segment the writer closed) is left
/// out: it could never be counted.
fn write_frames(
    source: &File,
    plain: &Path,
    temporary: &Path,
    level: i32,
) -> Result<(u64, u64), FileBusError> {
    let mut out =
        std::io::BufWriter::new(File::create(temporary).map_err(io_err("create", temporary))?);
    let mut entries: Vec<(u32, u32)> = Vec::new();
    let mut carry: Vec<u8> = Vec::new();
    let mut block = vec![0u8; FRAME_BYTES];
    let mut offset = 0u64;
    let mut compressed_total = 0u64;
    let mut ended = false;
    while !ended {
        let n = source
            .read_at(&mut block, offset)
            .map_err(io_err("read", plain))?;
        offset += n as u64;
        carry.extend_from_slice(&block[..n]);
        ended = n == 0;
        // Cut frames of whole lines, about FRAME_BYTES each (a longer line is one frame).
        while carry.len() >= FRAME_BYTES || (ended && !carry.is_empty()) {
            let window = carry.len().min(FRAME_BYTES);
            let cut = match carry[..window].iter().rposition(|&b| b == b'\n') {
                Some(at) => at + 1,
                None => match carry.iter().position(|&b| b == b'\n') {
                    Some(at) => at + 1,
                    None if ended => {
                        tracing::warn!(file = %plain.display(), bytes = carry.len(), "a closed segment ends in a partial line; it is left out of the compressed copy");
                        carry.clear();
                        break;
                    }
                    None => break,
                },
            };
            let frame =
                zstd::bulk::compress(&carry[..cut], level).map_err(io_err("compress", plain))?;
            out.write_all(&frame).map_err(io_err("write", temporary))?;
            entries.push((frame.len() as u32, cut as u32));
            compressed_total += frame.len() as u64;
            carry.drain(..cut);
        }
    }
    let table = seek_table_frame(&entries);
    out.write_all(&table).map_err(io_err("write", temporary))?;
    let file = out
        .into_inner()
        .map_err(|e| io_err("write", temporary)(e.into_error()))?;
    file.sync_all().map_err(io_err("sync", temporary))?;
    let content: u64 = entries.iter().map(|(_, c)| u64::from(*c)).sum();
    Ok((content, compressed_total + table.len() as u64))
}

/// The skippable frame holding the seek table of `entries` (compressed size, content size).
fn seek_table_frame(entries: &[(u32, u32)]) -> Vec<u8> {
    let body = entries.len() as u32 * ENTRY_BYTES as u32 + FOOTER_BYTES as u32;
    let mut out = Vec::with_capacity(body as usize + 8);
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&body.to_le_bytes());
    for (compressed, content) in entries {
        out.extend_from_slice(&compressed.to_le_bytes());
        out.extend_from_slice(&content.to_le_bytes());
    }
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.push(0);
    out.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(count: usize) -> Vec<u8> {
        let mut text = Vec::new();
        for n in 0..count {
            text.extend_from_slice(
                format!(
                    "{{\"id\":\"[{n}]\",\"data\":{{\"n\":{n},\"pad\":\"{}\"}}}}\n",
                    "x".repeat(n % 300)
                )
                .as_bytes(),
            );
        }
        text
    }

    #[test]
    fn frames_hold_whole_lines_and_every_offset_is_reachable() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("segment-00000000000000000007.jsonl");
        let content = lines(20_000);
        std::fs::write(&plain, &content).unwrap();
        let done = compress_segment(&plain, LEVEL).unwrap();
        assert!(!plain.exists(), "the plain copy is removed");
        assert_eq!(done.content_bytes, content.len() as u64);
        assert!(done.compressed_bytes * 4 < done.content_bytes, "{done:?}");
        let file = File::open(&done.path).unwrap();
        let table = SeekTable::read(&file, &done.path).unwrap();
        assert!(table.frames.len() >= 2, "{} frames", table.frames.len());
        assert_eq!(table.content_len(), content.len() as u64);
        let mut out = Vec::new();
        let mut whole = Vec::new();
        for frame in &table.frames {
            read_frame(&file, &done.path, frame, &mut out).unwrap();
            assert_eq!(out.last(), Some(&b'\n'), "a frame ends at a line end");
            whole.extend_from_slice(&out);
        }
        assert_eq!(whole, content);
        assert_eq!(table.frame_at(0), Some(0));
        let second = table.frames[1].content_offset;
        assert_eq!(table.frame_at(second - 1), Some(0));
        assert_eq!(table.frame_at(second), Some(1));
        assert_eq!(table.frame_at(content.len() as u64), None);
        // The standard decoder reads the file as it is, passing over the seek table.
        let decoded = zstd::stream::decode_all(File::open(&done.path).unwrap()).unwrap();
        assert_eq!(decoded, content);
    }

    #[test]
    fn a_truncated_file_is_named_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("segment-00000000000000000001.jsonl");
        std::fs::write(&plain, lines(100)).unwrap();
        let done = compress_segment(&plain, LEVEL).unwrap();
        let bytes = std::fs::read(&done.path).unwrap();
        std::fs::write(&done.path, &bytes[..bytes.len() - 3]).unwrap();
        let err = SeekTable::read(&File::open(&done.path).unwrap(), &done.path).unwrap_err();
        assert!(
            err.to_string()
                .contains("segment-00000000000000000001.jsonl.zst"),
            "{err}"
        );
    }
}
