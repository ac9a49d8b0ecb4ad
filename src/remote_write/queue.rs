//! The durable queue between batching and sending: one directory per shard, holding
//! append-only segment files of records `[len u32][samples u32][crc32 u32][newest i64]
//! [payload]` (little-endian; `newest` is the batch's newest sample timestamp, the payload a
//! ready-to-send remote-write body) and an `ack` file with
//! the position of the first record not yet delivered.
//!
//! A batch is written to its segment before it is sent, so an endpoint outage or an agent
//! restart (a crash, an OOM kill) loses nothing: the kernel holds what was written, after a
//! restart the sender resumes at `ack`, and the writer starts a new segment. A segment is
//! `fdatasync`ed when it closes and the open one by [`Queue::sync`], which the batcher calls
//! once a second and at shutdown, as Prometheus' write-ahead log syncs at segment ends rather
//! than per write: only a node crash or power loss can lose the last second of batches, and
//! the checksums below find the torn record it leaves. Past the disk cap the oldest segment
//! is deleted and its undelivered samples are counted as dropped. A record whose checksum fails (a torn write at a crash)
//! ends its segment: the reader moves on to the next one and counts what it skipped.
//!
//! A failed append (a full disk, an I/O error) leaves nothing behind: the segment is cut
//! back to its last whole record, so the records before it stay readable, and the next
//! append starts a new segment, so that once the sender has delivered the old one, deleting
//! it frees the space appends need. The caller counts the batch that was not written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use tokio::sync::Notify;

const HEADER: u64 = 20;
/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES: u64 = 8 << 20;

/// A position in the queue: segment number and byte offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub segment: u64,
    pub offset: u64,
}

/// One record read back.
#[derive(Debug)]
pub struct Record {
    pub payload: Vec<u8>,
    pub samples: u32,
    /// Newest sample timestamp in the batch (unix ms).
    pub newest_ms: i64,
}

/// What a cap enforcement or a corrupt record threw away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub samples: u64,
    pub records: u64,
}

struct Writer {
    segment: u64,
    file: File,
    len: u64,
}

/// One shard's queue.
pub struct Queue {
    dir: PathBuf,
    max_bytes: u64,
    writer: Mutex<Option<Writer>>,
    /// Where delivery resumes, and the open `ack` file that records it.
    acked: Mutex<(Cursor, Option<File>)>,
    /// Bytes in segment files, kept as they are written and deleted, so that an append
    /// under the cap costs no directory listing.
    disk_bytes: std::sync::atomic::AtomicU64,
    /// The segment being written has records not yet `fdatasync`ed (changed under the
    /// writer's lock; read without it, so the batcher can ask without waiting on a write).
    unsynced: std::sync::atomic::AtomicBool,
    /// Woken on every append.
    pub appended: Notify,
    /// A corrupt record the reader found in the segment being written: reported once, and
    /// the writer moves to a new segment so the reader can get past it.
    corrupt_at: Mutex<Option<Cursor>>,
}

/// The `ack` file's record: `segment offset crc` (crc32 of `segment offset`, hex), padded
/// to a fixed length so it is rewritten in place (one small write, no rename).
const ACK_LEN: usize = 64;

fn ack_record(c: Cursor) -> Vec<u8> {
    let text = format!("{} {}", c.segment, c.offset);
    let mut line = format!("{text} {:08x}", crc32fast::hash(text.as_bytes()));
    while line.len() < ACK_LEN - 1 {
        line.push(' ');
    }
    line.push('\n');
    line.into_bytes()
}

/// Parse an `ack` file. The old `segment offset` form (written with a rename) is accepted;
/// a record whose checksum does not match (a torn write at a crash) resumes from the start,
/// which sends some batches twice rather than skipping any.
fn parse_ack(text: &str) -> Cursor {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let cursor = |seg: &str, off: &str| -> Option<Cursor> {
        Some(Cursor {
            segment: seg.parse().ok()?,
            offset: off.parse().ok()?,
        })
    };
    match parts.as_slice() {
        [seg, off] => cursor(seg, off).unwrap_or_default(),
        [seg, off, crc] => {
            let ok = u32::from_str_radix(crc, 16).ok()
                == Some(crc32fast::hash(format!("{seg} {off}").as_bytes()));
            ok.then(|| cursor(seg, off)).flatten().unwrap_or_default()
        }
        _ => Cursor::default(),
    }
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:010}.seg"))
}

fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".seg")?
                .parse()
                .ok()
        })
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Sum the sample counts of the records in `path` from `offset` on (headers only).
fn count_from(path: &Path, offset: u64) -> io::Result<Dropped> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut pos = offset;
    let mut dropped = Dropped::default();
    let mut header = [0u8; HEADER as usize];
    while pos + HEADER <= len {
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut header)?;
        let n = u64::from(u32::from_le_bytes(
            header[0..4].try_into().expect("4 bytes"),
        ));
        dropped.samples += u64::from(u32::from_le_bytes(
            header[4..8].try_into().expect("4 bytes"),
        ));
        dropped.records += 1;
        pos += HEADER + n;
    }
    Ok(dropped)
}

impl Queue {
    /// Open (or create) the queue in `dir`. Writing starts in a new segment.
    ///
    /// ### Errors
    /// The directory cannot be created or listed.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Queue> {
        fs::create_dir_all(dir)?;
        let disk_bytes: u64 = segments(dir)?
            .into_iter()
            .filter_map(|s| fs::metadata(segment_path(dir, s)).ok())
            .map(|m| m.len())
            .sum();
        let acked = parse_ack(&fs::read_to_string(dir.join("ack")).unwrap_or_default());
        // The ack file gets its full size now, while there is room: later acks rewrite it
        // in place and need no new space, so progress is still recorded on a full disk.
        let ack_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("ack"))
            .and_then(|f| {
                use std::os::unix::fs::FileExt as _;
                f.set_len(ACK_LEN as u64)?;
                // In the current form at once (an old-form record would read back badly
                // once padded).
                f.write_all_at(&ack_record(acked), 0)?;
                Ok(f)
            })
            .ok();
        Ok(Queue {
            dir: dir.to_owned(),
            max_bytes,
            writer: Mutex::new(None),
            acked: Mutex::new((acked, ack_file)),
            disk_bytes: disk_bytes.into(),
            unsynced: false.into(),
            appended: Notify::new(),
            corrupt_at: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Writer>> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_acked(&self) -> std::sync::MutexGuard<'_, (Cursor, Option<File>)> {
        self.acked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Append one record (synced to disk later, see [`Queue::sync`]); returns what the disk
    /// cap made it drop.
    ///
    /// ### Errors
    /// Disk errors; the caller counts the batch as dropped.
    pub fn append(&self, payload: &[u8], samples: u32, newest_ms: i64) -> io::Result<Dropped> {
        let len =
            u32::try_from(payload.len()).map_err(|_| io::Error::other("record over 4 GiB"))?;
        let mut guard = self.lock();
        let rotate = guard.as_ref().is_none_or(|w| w.len >= SEGMENT_BYTES);
        if rotate {
            if let Some(closing) = guard.as_ref().filter(|_| self.needs_sync()) {
                closing.file.sync_data()?;
                self.unsynced.store(false, Relaxed);
            }
            let next = segments(&self.dir)?.last().map_or(1, |s| s + 1);
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(segment_path(&self.dir, next))?;
            *guard = Some(Writer {
                segment: next,
                file,
                len: 0,
            });
        }
        let w = guard.as_mut().expect("opened above");
        let mut record = Vec::with_capacity(HEADER as usize + payload.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&samples.to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        record.extend_from_slice(&newest_ms.to_le_bytes());
        record.extend_from_slice(payload);
        if let Err(error) = w.file.write_all(&record) {
            // Nothing of this record may stay: a partial one would hide the records
            // written after it. Cutting a file back frees space, so this works on a full
            // disk; should it fail too, the reader skips the torn tail of a closed segment.
            let _ = w.file.set_len(w.len);
            if w.len > 0 {
                // A new segment next: this one can be deleted once sent.
                if self.needs_sync() && w.file.sync_data().is_ok() {
                    self.unsynced.store(false, Relaxed);
                }
                *guard = None;
            }
            return Err(error);
        }
        w.len += record.len() as u64;
        self.unsynced.store(true, Relaxed);
        self.disk_bytes
            .fetch_add(record.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let current = w.segment;
        drop(guard);
        let dropped = self.enforce_cap(current)?;
        self.appended.notify_waiters();
        Ok(dropped)
    }

    /// `fdatasync` the segment being written, if anything was appended since its last sync.
    ///
    /// ### Errors
    /// Disk errors; the records stay in the page cache and the next sync tries again.
    pub fn sync(&self) -> io::Result<()> {
        let guard = self.lock();
        if let Some(w) = guard.as_ref().filter(|_| self.needs_sync()) {
            w.file.sync_data()?;
            self.unsynced.store(false, Relaxed);
        }
        Ok(())
    }

    /// Whether anything was appended since the last sync (no lock, no disk).
    pub fn needs_sync(&self) -> bool {
        self.unsynced.load(Relaxed)
    }

    /// Delete the oldest segments (never the one being written) while over the cap.
    fn enforce_cap(&self, current: u64) -> io::Result<Dropped> {
        let mut dropped = Dropped::default();
        if self.disk_bytes.load(std::sync::atomic::Ordering::Relaxed) <= self.max_bytes {
            return Ok(dropped);
        }
        loop {
            let ids = segments(&self.dir)?;
            let total: u64 = ids
                .iter()
                .filter_map(|s| fs::metadata(segment_path(&self.dir, *s)).ok())
                .map(|m| m.len())
                .sum();
            self.disk_bytes
                .store(total, std::sync::atomic::Ordering::Relaxed);
            let Some(&oldest) = ids.first() else { break };
            if total <= self.max_bytes || oldest == current {
                break;
            }
            let ack = self.ack_cursor();
            let from = if ack.segment == oldest { ack.offset } else { 0 };
            if ack.segment <= oldest {
                let d = count_from(&segment_path(&self.dir, oldest), from)?;
                dropped.samples += d.samples;
                dropped.records += d.records;
            }
            fs::remove_file(segment_path(&self.dir, oldest))?;
        }
        Ok(dropped)
    }

    /// Where delivery resumes.
    pub fn ack_cursor(&self) -> Cursor {
        self.lock_acked().0
    }

    /// Record that everything before `cursor` was delivered (rewriting the `ack` file in
    /// place), and delete segments that are wholly behind it.
    ///
    /// ### Errors
    /// Disk errors; delivery then resumes from the previous ack after a restart.
    pub fn ack(&self, cursor: Cursor) -> io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        let mut acked = self.lock_acked();
        if acked.1.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.dir.join("ack"))?;
            // A shorter record of the old format must not leave a tail behind.
            file.set_len(ACK_LEN as u64)?;
            acked.1 = Some(file);
        }
        acked
            .1
            .as_ref()
            .expect("opened above")
            .write_all_at(&ack_record(cursor), 0)?;
        let previous = std::mem::replace(&mut acked.0, cursor);
        drop(acked);
        if cursor.segment > previous.segment || previous == Cursor::default() {
            for s in segments(&self.dir)? {
                if s < cursor.segment {
                    let path = segment_path(&self.dir, s);
                    let len = fs::metadata(&path).map_or(0, |m| m.len());
                    fs::remove_file(path)?;
                    // Saturating: a cap enforcement may have recounted meanwhile.
                    let _ = self.disk_bytes.fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |b| Some(b.saturating_sub(len)),
                    );
                }
            }
        }
        Ok(())
    }

    /// The record at `cursor` and the cursor after it, or `None` when nothing complete is
    /// there yet. Moves past finished segments; a corrupt record skips the rest of its
    /// segment (returned as dropped).
    ///
    /// ### Errors
    /// Disk errors other than a missing or short file.
    pub fn next(&self, cursor: Cursor) -> io::Result<(Option<(Record, Cursor)>, Dropped)> {
        let mut cursor = cursor;
        let mut dropped = Dropped::default();
        loop {
            let ids = segments(&self.dir)?;
            let Some(&oldest) = ids.first() else {
                return Ok((None, dropped));
            };
            if cursor.segment < oldest {
                cursor = Cursor {
                    segment: oldest,
                    offset: 0,
                };
            }
            let later = ids.iter().any(|&s| s > cursor.segment);
            let path = segment_path(&self.dir, cursor.segment);
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound && later => {
                    cursor = Cursor {
                        segment: cursor.segment + 1,
                        offset: 0,
                    };
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((None, dropped)),
                Err(e) => return Err(e),
            };
            let len = file.metadata()?.len();
            if cursor.offset + HEADER > len {
                if later {
                    cursor = Cursor {
                        segment: cursor.segment + 1,
                        offset: 0,
                    };
                    continue;
                }
                return Ok((None, dropped));
            }
            file.seek(SeekFrom::Start(cursor.offset))?;
            let mut header = [0u8; HEADER as usize];
            file.read_exact(&mut header)?;
            let n = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
            let samples = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
            let crc = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
            let newest_ms = i64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
            let end = cursor.offset + HEADER + u64::from(n);
            if end > len {
                if later {
                    // A torn record at the end of a closed segment: skip it.
                    dropped.samples += u64::from(samples);
                    dropped.records += 1;
                    cursor = Cursor {
                        segment: cursor.segment + 1,
                        offset: 0,
                    };
                    continue;
                }
                return Ok((None, dropped)); // still being written
            }
            let mut payload = vec![0u8; n as usize];
            file.read_exact(&mut payload)?;
            if crc32fast::hash(&payload) != crc {
                if !later {
                    // In the segment being written: count it once, and have the writer
                    // start a new segment so the reader can move on.
                    let mut seen = self
                        .corrupt_at
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if *seen != Some(cursor) {
                        *seen = Some(cursor);
                        let rest = count_from(&path, cursor.offset)?;
                        dropped.samples += rest.samples;
                        dropped.records += rest.records;
                        let mut writer = self.lock();
                        if writer.as_ref().is_some_and(|w| w.segment == cursor.segment) {
                            *writer = None;
                        }
                    }
                    return Ok((None, dropped));
                }
                if self
                    .corrupt_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
                    != Some(cursor)
                {
                    let rest = count_from(&path, cursor.offset)?;
                    dropped.samples += rest.samples;
                    dropped.records += rest.records;
                }
                cursor = Cursor {
                    segment: cursor.segment + 1,
                    offset: 0,
                };
                continue;
            }
            return Ok((
                Some((
                    Record {
                        payload,
                        samples,
                        newest_ms,
                    },
                    Cursor {
                        segment: cursor.segment,
                        offset: end,
                    },
                )),
                dropped,
            ));
        }
    }

    /// Bytes on disk and undelivered samples (from the ack on).
    pub fn backlog(&self) -> (u64, u64) {
        let ack = self.ack_cursor();
        let mut bytes = 0;
        let mut samples = 0;
        for s in segments(&self.dir).unwrap_or_default() {
            let path = segment_path(&self.dir, s);
            bytes += fs::metadata(&path).map_or(0, |m| m.len());
            if s >= ack.segment {
                let from = if s == ack.segment { ack.offset } else { 0 };
                samples += count_from(&path, from).map_or(0, |d| d.samples);
            }
        }
        (bytes, samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "meshcanary-queue-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        fs::create_dir_all(&p).unwrap();
        p
    }

    fn drain(q: &Queue) -> Vec<Vec<u8>> {
        let mut out = vec![];
        let mut c = q.ack_cursor();
        while let (Some((r, next)), _) = q.next(c).unwrap() {
            out.push(r.payload);
            c = next;
            q.ack(c).unwrap();
        }
        out
    }

    #[test]
    fn an_append_waits_for_the_next_sync_and_a_sync_clears_it() {
        let dir = tmp();
        let q = Queue::open(&dir, 1 << 30).unwrap();
        assert!(!q.needs_sync(), "nothing written yet");
        q.append(b"one", 1, 0).unwrap();
        assert!(q.needs_sync());
        // Readable before it is synced: the sender does not wait for the disk.
        assert_eq!(drain(&q), vec![b"one".to_vec()]);
        q.sync().unwrap();
        assert!(!q.needs_sync());
        q.sync().unwrap(); // nothing to do
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn records_survive_a_restart_and_are_delivered_once() {
        let dir = tmp();
        let q = Queue::open(&dir, 1 << 30).unwrap();
        q.append(b"one", 1, 0).unwrap();
        q.append(b"two", 2, 0).unwrap();
        let (first, next) = q.next(q.ack_cursor()).unwrap().0.unwrap();
        assert_eq!(first.payload, b"one");
        q.ack(next).unwrap();
        drop(q);
        // Restart: the unacked record is still there, then new ones follow in a new segment.
        let q = Queue::open(&dir, 1 << 30).unwrap();
        q.append(b"three", 3, 0).unwrap();
        assert_eq!(q.backlog().1, 5);
        assert_eq!(drain(&q), vec![b"two".to_vec(), b"three".to_vec()]);
        assert_eq!(drain(&q), Vec::<Vec<u8>>::new());
        assert_eq!(q.backlog().1, 0);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_ack_record_is_checked_and_the_old_form_still_read() {
        let c = Cursor {
            segment: 12,
            offset: 3456,
        };
        let rec = ack_record(c);
        assert_eq!(rec.len(), ACK_LEN);
        assert_eq!(parse_ack(std::str::from_utf8(&rec).unwrap()), c);
        assert_eq!(parse_ack("12 3456\n"), c);
        // A torn rewrite (new digits over old) fails its checksum: resume from the start.
        let torn = String::from_utf8(rec).unwrap().replacen("3456", "3999", 1);
        assert_eq!(parse_ack(&torn), Cursor::default());
        assert_eq!(parse_ack("garbage"), Cursor::default());
        // Rewritten in place over an old, shorter record; a reopened queue resumes there.
        let dir = tmp();
        fs::write(dir.join("ack"), "1 0\n").unwrap();
        let q = Queue::open(&dir, 1 << 30).unwrap();
        q.ack(c).unwrap();
        q.ack(Cursor {
            segment: 12,
            offset: 7,
        })
        .unwrap();
        drop(q);
        assert_eq!(fs::metadata(dir.join("ack")).unwrap().len(), ACK_LEN as u64);
        let q = Queue::open(&dir, 1 << 30).unwrap();
        assert_eq!(
            q.ack_cursor(),
            Cursor {
                segment: 12,
                offset: 7
            }
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_disk_cap_drops_the_oldest_segment_and_counts_it() {
        let dir = tmp();
        let q = Queue::open(&dir, 100).unwrap();
        let big = vec![7u8; 80];
        assert_eq!(q.append(&big, 10, 0).unwrap(), Dropped::default());
        drop(q); // the next writer starts a new segment
        let q = Queue::open(&dir, 100).unwrap();
        let d = q.append(&big, 20, 0).unwrap();
        assert_eq!(
            d,
            Dropped {
                samples: 10,
                records: 1
            }
        );
        let (r, _) = q.next(q.ack_cursor()).unwrap().0.unwrap();
        assert_eq!(r.samples, 20);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_torn_record_is_skipped_and_counted() {
        let dir = tmp();
        let q = Queue::open(&dir, 1 << 30).unwrap();
        q.append(b"good", 1, 0).unwrap();
        q.append(b"torn", 4, 0).unwrap();
        drop(q);
        // Flip a payload byte of the second record, as a crash mid-write could leave it.
        let seg = segment_path(&dir, 1);
        let mut bytes = fs::read(&seg).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&seg, bytes).unwrap();
        let q = Queue::open(&dir, 1 << 30).unwrap();
        q.append(b"after", 2, 0).unwrap();
        let (r, c) = q.next(q.ack_cursor()).unwrap().0.unwrap();
        assert_eq!(r.payload, b"good");
        let (next, dropped) = q.next(c).unwrap();
        assert_eq!(
            dropped,
            Dropped {
                samples: 4,
                records: 1
            }
        );
        assert_eq!(next.unwrap().0.payload, b"after");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_corrupt_record_in_the_segment_being_written_is_counted_once_and_passed() {
        let dir = tmp();
        let q = Queue::open(&dir, 1 << 30).unwrap();
        q.append(b"good", 1, 0).unwrap();
        q.append(b"bad!", 4, 0).unwrap();
        let seg = segment_path(&dir, 1);
        let mut bytes = fs::read(&seg).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&seg, bytes).unwrap();
        let (r, c) = q.next(q.ack_cursor()).unwrap().0.unwrap();
        assert_eq!(r.payload, b"good");
        // Every poll meets it; it is counted at the first only.
        let mut counted = 0;
        for _ in 0..5 {
            let (next, dropped) = q.next(c).unwrap();
            assert!(next.is_none());
            counted += dropped.samples;
        }
        assert_eq!(counted, 4);
        // The writer moved to a new segment, so the reader gets past the bad one.
        q.append(b"after", 2, 0).unwrap();
        let (next, dropped) = q.next(c).unwrap();
        assert_eq!(dropped, Dropped::default(), "not counted a second time");
        assert_eq!(next.unwrap().0.payload, b"after");
        fs::remove_dir_all(dir).unwrap();
    }
}
