//! `tollgate-deploy-check wan TARGET DELAY_MS PORT...`: a TCP relay that stands between two
//! regions and holds every byte for DELAY_MS in each direction before passing it on, the
//! way a WAN link would. This machine's kernel has no netem, so the delay is added here.
//!
//! It listens on each PORT and relays to the same port on TARGET (a name resolved at each
//! connection). Bytes are delayed, not the connection: a stream keeps its throughput, and
//! every chunk arrives DELAY_MS after it was read.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub async fn run(args: &[String]) -> Result<()> {
    let [target, delay, ports @ ..] = args else {
        bail!("usage: tollgate-deploy-check wan TARGET DELAY_MS PORT...");
    };
    let delay = Duration::from_millis(delay.parse().context("DELAY_MS must be a whole number")?);
    if ports.is_empty() {
        bail!("name at least one PORT to relay");
    }
    let mut tasks = Vec::new();
    for port in ports {
        let port: u16 = port.parse().with_context(|| format!("bad port {port:?}"))?;
        let listener = TcpListener::bind(("0.0.0.0", port)).await?;
        println!("relaying :{port} to {target}:{port} with {delay:?} each way");
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let target = target.clone();
                tokio::spawn(async move {
                    if let Err(e) = relay(client, &target, port, delay).await {
                        eprintln!("relay to {target}:{port}: {e:#}");
                    }
                });
            }
        }));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    Ok(())
}

async fn relay(client: TcpStream, target: &str, port: u16, delay: Duration) -> Result<()> {
    let upstream = TcpStream::connect((target, port)).await?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let (a, b) = tokio::join!(delayed(cr, uw, delay), delayed(ur, cw, delay));
    a.and(b)
}

/// Copies `from` to `to`, each chunk `delay` after it was read; EOF is passed on the same way.
async fn delayed(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    delay: Duration,
) -> Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            let eof = chunk.is_none();
            if tx.send((Instant::now() + delay, chunk)).is_err() || eof {
                return;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            match chunk {
                Some(c) => to.write_all(&c).await?,
                None => break,
            }
        }
        to.shutdown().await?;
        anyhow::Ok(())
    };
    let ((), written) = tokio::join!(read, write);
    written
}
