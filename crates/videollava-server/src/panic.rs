//! A panic in a handler fails that request with a generic 500 (details in the log) instead of
//! resetting the connection.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Middleware: runs the rest of the stack, turning a panic while polling it into a 500.
pub async fn catch_panic(req: Request, next: Next) -> Response {
    match CatchUnwind(Box::pin(next.run(req))).await {
        Ok(resp) => resp,
        Err(detail) => {
            tracing::error!("a request handler panicked: {detail}");
            ApiError::internal(format!("handler panic: {detail}")).into_response()
        }
    }
}

/// Polls the inner future inside `catch_unwind`.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_handler_answers_a_generic_500_and_the_server_goes_on() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async {
            let app = axum::Router::new()
                .route(
                    "/boom",
                    axum::routing::get(|| async {
                        let missing: Option<&'static str> = std::hint::black_box(None);
                        missing.expect("secret internal detail")
                    }),
                )
                .route("/ok", axum::routing::get(|| async { "fine" }))
                .layer(axum::middleware::from_fn(catch_panic));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            let get = move |path: &'static str| {
                tokio::task::spawn_blocking(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                    let mut r = agent.get(format!("http://{addr}{path}")).call().unwrap();
                    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
                })
            };
            let (status, body) = get("/boom").await.unwrap();
            assert_eq!(status, 500, "{body}");
            assert!(body.contains("internal server error") && !body.contains("secret"), "{body}");
            assert_eq!(get("/ok").await.unwrap(), (200, "fine".to_string()));
        });
    }
}
